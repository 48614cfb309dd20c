from .counterfact import counterfact_metrics
from .perplexity import PerplexityResult, perplexity
from .scoring import TargetScore, score_targets

__all__ = ["counterfact_metrics", "PerplexityResult", "perplexity", "TargetScore", "score_targets"]
