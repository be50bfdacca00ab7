"""Model soups: parameter averages of fine-tuned checkpoints (uniform, weighted, or greedy by a held-out score).

Ingredients are saved gemb model dirs, DeepSpeed ZeRO checkpoints (consolidated first) or MLflow runs whose
artifacts hold a gemb model dir. One module a concern: `config` (SoupConfig), `checks` (same architecture and
tensors), `average` (streamed weighted means), `greedy` (selection), `ingredients` (each as a local model dir),
`job` (make_soup, run_soup, lineage).
"""

from gemb_dist.soup.average import average_model_dirs, average_state_dicts
from gemb_dist.soup.checks import check_same_architecture, check_same_tensors
from gemb_dist.soup.config import HeldOutConfig, IngredientConfig, SoupConfig
from gemb_dist.soup.greedy import GreedyResult, greedy_select
from gemb_dist.soup.ingredients import consolidate_zero_checkpoint, resolve_ingredient
from gemb_dist.soup.job import LINEAGE_FILE, SoupResult, held_out_scorer, log_lineage, make_soup, run_soup

__all__ = [
    "LINEAGE_FILE",
    "GreedyResult",
    "HeldOutConfig",
    "IngredientConfig",
    "SoupConfig",
    "SoupResult",
    "average_model_dirs",
    "average_state_dicts",
    "check_same_architecture",
    "check_same_tensors",
    "consolidate_zero_checkpoint",
    "greedy_select",
    "held_out_scorer",
    "log_lineage",
    "make_soup",
    "resolve_ingredient",
    "run_soup",
]
