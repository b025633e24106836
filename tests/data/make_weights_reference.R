# Reference values for prior weights and offsets (lme4's weights= and offset=/offset(x)),
# used by tests/test_weights.py. Run from the repository root:
#   Rscript tests/data/make_weights_reference.R
# Writes tests/data/weights_data_*.csv (the data with the weights and offsets used) and
# tests/data/reference/weights.json.
suppressMessages({library(lme4); library(jsonlite)})
ctrl <- lmerControl(optimizer = "nloptwrap",
                    optCtrl = list(xtol_abs = 1e-12, ftol_abs = 1e-14, maxeval = 1e5))
set.seed(20261203)
ss <- read.csv("tests/data/sleepstudy.csv"); ss$Subject <- factor(ss$Subject)
ss$w <- round(runif(nrow(ss), 0.25, 3), 4)
ss$o <- round(rnorm(nrow(ss), 0, 20), 4)
pen <- read.csv("tests/data/Penicillin.csv")
pen$plate <- factor(pen$plate); pen$sample <- factor(pen$sample)
pen$w <- round(runif(nrow(pen), 0.25, 3), 4)
pen$o <- round(rnorm(nrow(pen), 0, 1), 4)
write.csv(ss, "tests/data/weights_data_sleepstudy.csv", row.names = FALSE)
write.csv(pen, "tests/data/weights_data_penicillin.csv", row.names = FALSE)

one <- function(name, formula, data, reml, weights = NULL, offset = NULL) {
  args <- list(formula = as.formula(formula), data = data, REML = reml, control = ctrl)
  if (!is.null(weights)) args$weights <- data[[weights]]
  if (!is.null(offset)) args$offset <- data[[offset]]
  f <- do.call(lmer, args)
  vc <- as.data.frame(VarCorr(f))
  list(name = name, formula = formula, reml = reml, weights = weights, offset = offset,
       loglik = as.numeric(logLik(f)), fixef = as.list(fixef(f)),
       se = as.list(sqrt(diag(as.matrix(vcov(f))))), theta = unname(getME(f, "theta")),
       sigma = sigma(f), vcov = vc$vcov, grp = vc$grp, nobs = nobs(f))
}
cases <- list()
for (reml in c(TRUE, FALSE)) {
  tag <- if (reml) "reml" else "ml"
  cases[[length(cases) + 1]] <- one(paste0("sleep_w_", tag), "Reaction ~ Days + (Days | Subject)", ss, reml, weights = "w")
  cases[[length(cases) + 1]] <- one(paste0("sleep_off_", tag), "Reaction ~ Days + (Days | Subject)", ss, reml, offset = "o")
  cases[[length(cases) + 1]] <- one(paste0("sleep_w_offterm_", tag), "Reaction ~ Days + offset(o) + (Days | Subject)", ss, reml, weights = "w")
  cases[[length(cases) + 1]] <- one(paste0("pen_w_", tag), "diameter ~ 1 + (1 | plate) + (1 | sample)", pen, reml, weights = "w")
  cases[[length(cases) + 1]] <- one(paste0("pen_w_off_", tag), "diameter ~ 1 + (1 | plate) + (1 | sample)", pen, reml, weights = "w", offset = "o")
  cases[[length(cases) + 1]] <- one(paste0("pen_offterm_", tag), "diameter ~ 1 + offset(o) + (1 | plate) + (1 | sample)", pen, reml)
}
writeLines(toJSON(list(lme4 = as.character(packageVersion("lme4")), cases = cases),
                  auto_unbox = TRUE, digits = NA, null = "null", pretty = TRUE),
           "tests/data/reference/weights.json")
