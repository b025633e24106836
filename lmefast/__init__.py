"""lmefast: fast, accurate linear mixed-effects models.

statsmodels' API (``MixedLM``, ``mixedlm``) with lme4's numbers.
"""
from lmefast.api_lmer import lmer, lmer_model
from lmefast.inference import lrtest
from lmefast.model import MixedLM, mixedlm
from lmefast.results import MixedLMResults
from lmefast.spec import SpecificationError

__all__ = ["MixedLM", "MixedLMResults", "SpecificationError", "lmer", "lmer_model", "lrtest", "mixedlm"]
__version__ = "0.1.0"
