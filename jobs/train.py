"""Train R_T, R_E, the defender's GAN G (on the private set D) and the attacker's
generator F (on the auxiliary set) as concurrent Ray Tune trials.

    python jobs/train.py [--preset orl] [--set target.epochs=30]
    ray job submit --working-dir . -- python jobs/train.py

Artifacts whose config hash already exists are reused (a rerun retrains nothing).
The work is :func:`raymia.pipelines.train.run`; also ``raymia-train``."""
from raymia.cli import train

if __name__ == "__main__":
    train()
