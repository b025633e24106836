# Reference values for R's formula idioms in lmefast.lmer (tests/test_lmer_idioms.py):
# factor() in the fixed part and left of the bar, back-quoted names of the response and the
# grouping factor, and lme4's names of nested factors. Fitted at the optimum as in
# make_lme4_reference.R (lme4's default answer refitted at tight tolerances).
# Usage: Rscript make_idioms_reference.R datadir out.json
# Needs R with lme4 and jsonlite (Debian: r-cran-lme4 r-cran-jsonlite).
suppressMessages({library(lme4); library(jsonlite)})
args <- commandArgs(TRUE)
datadir <- args[1]
read <- function(name) read.csv(file.path(datadir, paste0(name, ".csv")), stringsAsFactors = TRUE,
                                check.names = FALSE)

tight_fit <- function(formula, d, reml) {
  f <- as.formula(formula)
  m <- do.call(lme4::lmer, list(f, data = d, REML = reml))
  c2 <- lmerControl(optimizer = "bobyqa", calc.derivs = FALSE,
                    optCtrl = list(rhobeg = 1e-3, rhoend = 1e-12, maxfun = 100000))
  m2 <- suppressMessages(do.call(lme4::lmer, list(f, data = d, REML = reml, control = c2,
                                                  start = list(theta = getME(m, "theta")))))
  if (as.numeric(logLik(m2)) >= as.numeric(logLik(m))) m2 else m
}

sleep <- read("sleepstudy")
sleep$phase <- sleep$Days %/% 4            # 0, 1, 2: numeric, made a factor in the formula
quoted <- sleep
names(quoted)[names(quoted) == "Reaction"] <- "Reaction time"
names(quoted)[names(quoted) == "Subject"] <- "Subject id"
pastes <- read("Pastes")

cases <- list(
  list(id = "factor_interaction", d = sleep,
       formula = "Reaction ~ Days * factor(phase) + (Days | Subject)"),
  list(id = "factor_left_of_bar", d = sleep,
       formula = "Reaction ~ Days + (0 + factor(phase) | Subject)"),
  list(id = "backquoted_names", d = quoted,
       formula = "`Reaction time` ~ Days + (Days | `Subject id`)"),
  list(id = "nested_names", d = pastes, formula = "strength ~ 1 + (1 | batch/cask)")
)
out <- list()
for (cs in cases) {
  for (reml in c(TRUE, FALSE)) {
    m <- tight_fit(cs$formula, cs$d, reml)
    vc <- as.data.frame(VarCorr(m))
    key <- paste0(cs$id, if (reml) "__reml" else "__ml")
    out[[key]] <- list(
      formula = cs$formula, reml = reml,
      loglik = as.numeric(logLik(m)),
      fixef = as.list(fixef(m)),
      se_fixef = as.list(sqrt(diag(as.matrix(vcov(m))))),
      theta = unname(getME(m, "theta")),
      sigma = sigma(m),
      vcov = vc$vcov, grp = vc$grp,
      ranef_names = names(ranef(m)),
      ranef_levels = lapply(ranef(m), rownames)
    )
  }
}
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE, pretty = TRUE), args[2])
