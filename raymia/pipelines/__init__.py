"""The pipelines, each one ``run(cfg, out=None, address=None, ...) -> Path`` returning its
output directory: ``train`` (R_T, R_E, G, F), ``alpha_sweep`` (the dummy-model paper end
to end), ``defense_search`` (Tune search with the attack in the loop, multi-seed check),
``filter_sweep`` (the similarity-filter paper).  ``jobs/*.py`` and the ``raymia-*``
console commands only parse arguments and call these; tests call them directly.
Ray is imported only where a pipeline starts Ray work (``raymia.distributed``)."""
