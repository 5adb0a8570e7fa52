"""Ray for raymia: the only package that imports Ray.

``runtime`` starts or joins Ray and sizes trials; ``tune`` builds and runs Tune
experiments and collects their errors; ``training`` trains missing artifacts as Tune
trials (:func:`~raymia.distributed.training.ensure_artifacts`); ``evaluator`` is the
actor that scores reconstructions; ``alpha_sweep``, ``defense_search`` and
``filter_sweep`` hold each experiment's Tune trials and actors.  The pipelines
(:mod:`raymia.pipelines`) call these; everything else in raymia is plain torch/numpy."""
