import pickle

import pytest
import torch

from raymia.artifacts import CheckpointError, load_artifact, load_state, save_artifact
from raymia.config import config_from_dict
from raymia.models import build_discriminator, build_generator
from raymia.training import accuracy, load_classifier, train_artifact, train_classifier, train_gan


def test_short_training_beats_chance(orl_smoke):
    cfg, b = orl_smoke
    model, m = train_classifier(cfg.target, b.private_train, b.private_test, b.n_private, "cpu", seed=0)
    chance = 1.0 / b.n_private
    assert m["test_acc"] >= chance + 0.4, m            # 5 identities: chance 20%
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_gan_step_trains(orl_smoke):
    """A few D steps on fixed real/fake batches separate them; one G step then raises D's
    score of the fakes (the two updates the GAN loop alternates)."""
    cfg, b = orl_smoke
    torch.manual_seed(0)
    G, D = build_generator(cfg.gan, 1, 32), build_discriminator(cfg.gan, 1, 32)
    real = b.private_train.x[:16]
    z = torch.randn(16, cfg.gan.latent_dim)
    od = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999))
    og = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    sp = torch.nn.functional.softplus
    d_losses = []
    for _ in range(15):
        loss = sp(-D(real)).mean() + sp(D(G(z).detach())).mean()
        od.zero_grad(); loss.backward(); od.step()
        d_losses.append(float(loss.detach()))
    assert d_losses[-1] < d_losses[0] * 0.7
    before = float(D(G(z)).mean().detach())
    for _ in range(3):
        g_loss = sp(-D(G(z))).mean()
        og.zero_grad(); g_loss.backward(); og.step()
    assert float(D(G(z)).mean().detach()) > before


def test_train_gan_moves_samples_towards_the_data(orl_smoke):
    """The GAN loop itself (150 iterations at smoke width): its eval-mode samples take on
    the faces' mean image (an untrained G's do not) with the data's spread (no collapse),
    G comes back frozen, and the loop is seeded (same seed, same generator)."""
    cfg, b = orl_smoke
    gc = config_from_dict(cfg.to_dict()).gan
    gc.iters = 150
    real = b.private_train.x
    z = torch.randn(64, gc.latent_dim, generator=torch.Generator().manual_seed(1))

    def mean_corr_and_spread(G):
        with torch.no_grad():
            x = G(z).flatten(1)
        corr = torch.corrcoef(torch.stack([x.mean(0), real.flatten(1).mean(0)]))[0, 1]
        return float(corr), float(x.std(0).mean())
    torch.manual_seed(0)
    corr0, _ = mean_corr_and_spread(build_generator(gc, 1, 32).eval())
    G, m = train_gan(gc, real, "cpu", seed=3, hflip=True)
    corr, spread = mean_corr_and_spread(G)
    real_spread = float(real.flatten(1).std(0).mean())
    assert corr > 0.5 and corr > corr0 + 0.3, (corr0, corr)          # measured: -0.05 -> 0.64
    assert 0.5 * real_spread < spread < 2 * real_spread, (spread, real_spread)   # 0.13 vs 0.14
    assert not G.training and not any(p.requires_grad for p in G.parameters())
    assert m["n_images"] == len(real) and m["seconds"] > 0
    G2, _ = train_gan(gc, real, "cpu", seed=3, hflip=True)
    with torch.no_grad():
        assert torch.equal(G(z), G2(z))


def test_checkpoint_round_trip_and_refusals(orl_smoke, tmp_path):
    cfg, b = orl_smoke
    cfg = config_from_dict(cfg.to_dict())          # a deep copy: the session fixture stays as it is
    cfg.run.out_root = str(tmp_path)
    cfg.target.epochs = 2
    d = train_artifact(cfg, "target", bundle=b)
    model, man = load_classifier(d)
    assert man["kind"] == "target" and "test_acc" in man["metrics"]
    assert accuracy(model, b.private_test, "cpu") == pytest.approx(man["metrics"]["test_acc"])
    # rerun with the same config: nothing is retrained
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert train_artifact(cfg, "target", bundle=b) == d
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime

    # tampering: one flipped byte is caught by the manifest's sha256
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="modified after it was written"):
        load_artifact(d)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "payload": Evil()}, p)
    with pytest.raises(CheckpointError, match="pickled code"):
        load_state(p)
    # a pickle disguised as safetensors, listed in a correct manifest
    d = save_artifact(tmp_path / "art", {"model": {"w": torch.ones(3)}}, {"kind": "x"})
    (d / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    import hashlib, json
    man = json.loads((d / "manifest.json").read_text())
    man["files"]["model.safetensors"] = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_artifact(d)
    # clean tensors-only .pt loads
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_state(tmp_path / "ok.pt")["w"], torch.ones(2))


def test_a_trial_waits_for_an_artifact_its_sibling_trains(tmp_path):
    """One training phase holds R_dmy and the G it needs: R_dmy's trial waits until G's
    artifact is stored (written atomically by the sibling trial), and gives up with a clear
    error after its deadline."""
    import threading
    from raymia.config import load_config
    from raymia.distributed.training import _job, wait_for_artifacts
    from raymia.kinds import artifact_dir, kind
    cfg = load_config("smoke", [f"run.out_root={tmp_path}"])
    assert kind("dummy-calibrated").needs == ("gan",) and _job("dummy-paper@1") == ("dummy-paper", 1)
    with pytest.raises(RuntimeError, match="gan did not appear within 0 s"):
        wait_for_artifacts(cfg, ["gan"], timeout_s=0.3, poll_s=0.1)
    g = artifact_dir(cfg, "gan")
    t = threading.Timer(0.5, lambda: save_artifact(g, {"model": {"w": torch.zeros(1)}}, {"kind": "gan"}))
    t.start()
    wait_for_artifacts(cfg, ["gan"], timeout_s=30, poll_s=0.1)
    t.join()
    from raymia.artifacts import artifact_exists
    assert artifact_exists(g)
