# Reference values for Kenward-Roger with prior weights, used by tests/test_weights_kr.py.
# Run from the repository root:
#   Rscript tests/data/make_weights_kr_reference.R
# Writes tests/data/reference/weights_kr.json.
#
# pbkrtest (0.5.2) accepts a weighted lmer fit but builds V = Σ_r γ_r G_r + σ² I: the residual
# term ignores the weights, while vcov(fit) (its Φ) uses them. The weighted model's marginal
# covariance is V = ZΣZ' + σ² W⁻¹ with ∂V/∂σ² = W⁻¹; this script runs pbkrtest's own
# vcovAdj_internal and Lb_ddf with that residual term (G_σ² = W⁻¹) and records both.
suppressMessages({library(lme4); library(pbkrtest); library(Matrix); library(jsonlite)})
ctrl <- lmerControl(optimizer = "nloptwrap",
                    optCtrl = list(xtol_abs = 1e-12, ftol_abs = 1e-14, maxeval = 1e5))
ss <- read.csv("tests/data/weights_data_sleepstudy.csv"); ss$Subject <- factor(ss$Subject)
pen <- read.csv("tests/data/weights_data_penicillin.csv")
pen$plate <- factor(pen$plate); pen$sample <- factor(pen$sample)

weighted_sigmaG <- function(f, w) {
  S <- pbkrtest:::.get_SigmaG(f)
  S$G[[S$n.ggamma]] <- Diagonal(x = 1 / w)
  vc <- VarCorr(f)
  gam <- unlist(lapply(vc, function(L) L[lower.tri(L, diag = TRUE)]))
  gam <- c(gam, sigma(f)^2)
  S$Sigma <- Reduce(`+`, Map(function(g, G) g * G, gam, S$G))
  S
}

one <- function(name, formula, data, weights, offset = NULL) {
  args <- list(formula = as.formula(formula), data = data, REML = TRUE, control = ctrl,
               weights = data[[weights]])
  if (!is.null(offset)) args$offset <- data[[offset]]
  f <- do.call(lmer, args)
  X <- getME(f, "X")
  Phi <- vcov(f)
  PhiA <- pbkrtest:::vcovAdj_internal(Phi, weighted_sigmaG(f, data[[weights]]), X)
  p <- ncol(X)
  df <- sapply(seq_len(p), function(j) {
    L <- matrix(0, 1, p); L[1, j] <- 1
    pbkrtest:::Lb_ddf(L, Phi, PhiA)
  })
  ignoring <- sapply(seq_len(p), function(j) {
    L <- matrix(0, 1, p); L[1, j] <- 1
    get_Lb_ddf(f, L)
  })
  list(name = name, formula = formula, weights = weights, offset = offset,
       loglik = as.numeric(logLik(f)), fixef = as.list(fixef(f)),
       df_kenward_roger = as.list(setNames(df, colnames(X))),
       vcov_adjusted = unname(as.matrix(PhiA)),
       df_pbkrtest_residual_ignoring_weights = as.list(setNames(ignoring, colnames(X))))
}
cases <- list(
  one("sleep_w", "Reaction ~ Days + (Days | Subject)", ss, "w"),
  one("sleep_w_off", "Reaction ~ Days + (Days | Subject)", ss, "w", "o"),
  one("sleep_w_uncorr", "Reaction ~ Days + (Days || Subject)", ss, "w"),
  one("pen_w", "diameter ~ 1 + (1 | plate) + (1 | sample)", pen, "w"))
writeLines(toJSON(list(lme4 = as.character(packageVersion("lme4")),
                       pbkrtest = as.character(packageVersion("pbkrtest")), cases = cases),
                  auto_unbox = TRUE, digits = NA, null = "null", pretty = TRUE),
           "tests/data/reference/weights_kr.json")
