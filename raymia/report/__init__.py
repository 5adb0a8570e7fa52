"""Report stage: tables and figures like the papers', our numbers beside theirs.

``dummy``: the dummy-model defense's figures; ``tables``: markdown tables; ``filter``:
the similarity filter's tables and figures."""
from .dummy import VARIANT_STYLE, alpha_sweep_plot, mia_grid, pareto_plot  # noqa: F401
from .tables import markdown_table, md  # noqa: F401
