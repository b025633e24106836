"""The exceptions of lmefast, one module at the bottom of the layers so that every layer can
raise them and users can catch them from one place."""
from __future__ import annotations


class SpecificationError(ValueError):
    """Bad input to a model: the message names the column, term or group at fault."""


class ObjectiveError(FloatingPointError):
    """The objective cannot be evaluated at this θ."""


class RowsUnavailableError(RuntimeError):
    """The fit kept only the cross-products: the rows are not in memory."""


class InferenceError(ValueError):
    """A test or interval that cannot be computed as asked (the message says why)."""


class ProfileError(ValueError):
    """A likelihood profile that cannot be computed as asked."""


class BootstrapError(ValueError):
    """The bootstrap or simulation cannot be run as asked."""


class PredictionError(ValueError):
    """New data that cannot be used for prediction (the message names the column)."""


class ConvergenceWarning(UserWarning):
    """The optimiser stopped before the convergence criteria were met."""


class IgnoredArgumentWarning(FutureWarning):
    """A statsmodels argument that has no meaning in lmefast was given and is ignored (a
    FutureWarning, as statsmodels' own warning for arguments it does not use)."""


class SingularFitWarning(UserWarning):
    """A boundary (singular) fit: a variance parameter is estimated as zero (``res.singular``;
    statsmodels' SingularMatrixWarning, lme4's 'boundary (singular) fit' message)."""


class UnidentifiableWarning(UserWarning):
    """As many random effects as observations (or more): the random-effects variances and the
    residual variance are not identifiable; statsmodels fits such models, lme4 refuses them."""
