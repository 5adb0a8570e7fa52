"""The study: the alpha sweep repeated over seeds x identity folds (every ORL identity a
target in some fold), pooled into estimates with hierarchical 95% CIs per judge and draw.

    python jobs/study.py [--preset orl] [--set "study.seeds=[0,1,2]"] [--out DIR]
    ray job submit --working-dir . -- python jobs/study.py

Resumable: each (seed, fold) unit is a whole alpha sweep that reuses what it finished.
The work is :func:`raymia.pipelines.study.run`; also ``raymia-study``."""
from raymia.cli import study

if __name__ == "__main__":
    study()
