# Reference values beyond make_lme4_reference.R, for tests/test_reference_extra.py:
#  * likelihood-ratio tests: lme4's anova(m0, m1) on pairs of fits;
#  * type-3 ANOVA with Kenward-Roger denominator df (lmerTest's anova(m, ddf = "Kenward-Roger"));
#  * parametric bootstrap replicates (lme4's bootMer, fixed seed) of the variance parameters and
#    fixed effects, to compare bootstrap intervals in distribution.
# Every model is fitted at the optimum as in make_lme4_reference.R (lme4's default answer refitted at
# tight tolerances). bootMer refits its replicates with lme4's default optimiser settings: their
# distance from each replicate's optimum (≤ 1e-3 of a standard error) is negligible beside the
# bootstrap's own spread.
# Usage: Rscript make_extra_reference.R datadir out.json
# Needs R with lme4, lmerTest, pbkrtest and jsonlite (Debian: r-cran-lme4 r-cran-lmertest r-cran-pbkrtest r-cran-jsonlite).
suppressMessages({library(lme4); library(lmerTest); library(jsonlite); library(pbkrtest)})
args <- commandArgs(TRUE)
datadir <- args[1]
read <- function(name) read.csv(file.path(datadir, paste0(name, ".csv")), stringsAsFactors = TRUE)

tight_fit <- function(formula, d, reml) {
  f <- as.formula(formula)
  m <- do.call(lme4::lmer, list(f, data = d, REML = reml))
  c1 <- lmerControl(optimizer = "nloptwrap", calc.derivs = FALSE, optCtrl = list(algorithm = "NLOPT_LN_BOBYQA",
    xtol_rel = 1e-14, ftol_rel = 1e-16, ftol_abs = 1e-16, xtol_abs = 1e-14, maxeval = 100000))
  c2 <- lmerControl(optimizer = "bobyqa", calc.derivs = FALSE, optCtrl = list(rhobeg = 1e-3, rhoend = 1e-12, maxfun = 100000))
  # do.call: the call holds the objects themselves (lmer re-evaluates its call in another frame)
  m1 <- suppressMessages(do.call(lme4::lmer, list(f, data = d, REML = reml, control = c1, start = list(theta = getME(m, "theta")))))
  m2 <- suppressMessages(do.call(lme4::lmer, list(f, data = d, REML = reml, control = c2, start = list(theta = getME(m1, "theta")))))
  fits <- list(m, m1, m2)
  fits[[which.max(sapply(fits, function(x) as.numeric(logLik(x))))]]
}

# -- likelihood-ratio tests: anova(m0, m1). refit = TRUE compares ML fits: fitted here at the ML
# optimum (anova's own refit would stop where lme4's default rule stops).
lrt_cases <- list(
  list(id = "dietox_ri_vs_rs_ml", data = "dietox", reml = FALSE,
       formulas = c("Weight ~ Time + (1|Pig)", "Weight ~ Time + (1+Time|Pig)")),
  list(id = "dietox_ri_vs_rs_reml", data = "dietox", reml = TRUE,
       formulas = c("Weight ~ Time + (1|Pig)", "Weight ~ Time + (1+Time|Pig)")),
  list(id = "dietox_cu_ml", data = "dietox", reml = FALSE,
       formulas = c("Weight ~ Time + (1+Time|Pig)", "Weight ~ Time + Cu + (1+Time|Pig)")),
  list(id = "pastes_one_vs_nested_ml", data = "Pastes", reml = FALSE,
       formulas = c("strength ~ 1 + (1|batch)", "strength ~ 1 + (1|batch/cask)"))
)
lrt <- lapply(lrt_cases, function(cs) {
  d <- read(cs$data)
  m0 <- tight_fit(cs$formulas[1], d, cs$reml)
  m1 <- tight_fit(cs$formulas[2], d, cs$reml)
  a <- anova(m0, m1, refit = FALSE)
  list(id = cs$id, data = cs$data, reml = cs$reml, formulas = cs$formulas,
       npar = unname(a[["npar"]]), AIC = unname(a[["AIC"]]), BIC = unname(a[["BIC"]]),
       logLik = unname(a[["logLik"]]), deviance = unname(a[[if ("-2*log(L)" %in% names(a)) "-2*log(L)" else "deviance"]]),
       Chisq = unname(a[["Chisq"]])[2], Df = unname(a[["Df"]])[2], p = unname(a[["Pr(>Chisq)"]])[2])
})

# -- type-3 ANOVA, Kenward-Roger
kr_cases <- list(list(id = "dietox_cat", data = "dietox", formula = "Weight ~ Time + Cu + (1+Time|Pig)"),
                 list(id = "orthodont", data = "Orthodont", formula = "distance ~ age + Sex + (age|Subject)"))
anova_kr <- lapply(kr_cases, function(cs) {
  m <- lmerTest::as_lmerModLmerTest(tight_fit(cs$formula, read(cs$data), TRUE))
  a <- anova(m, type = 3, ddf = "Kenward-Roger")
  list(id = cs$id, terms = rownames(a), F = unname(a[["F value"]]), NumDF = unname(a[["NumDF"]]),
       DenDF = unname(a[["DenDF"]]), p = unname(a[["Pr(>F)"]]))
})

# -- parametric bootstrap (bootMer, use.u = FALSE: new random effects in every replicate)
sdcor_names <- function(m) {
  v <- as.data.frame(VarCorr(m))
  ifelse(v$grp == "Residual", "sigma",
         ifelse(is.na(v$var2), paste0("sd_", v$var1, "|", v$grp), paste0("cor_", v$var2, ".", v$var1, "|", v$grp)))
}
boot_stat <- function(m) c(as.data.frame(VarCorr(m))$sdcor, fixef(m))
boot_cases <- list(list(id = "sleep_rs", data = "sleepstudy", formula = "Reaction ~ Days + (Days|Subject)"),
                   list(id = "penicillin_crossed", data = "Penicillin", formula = "diameter ~ 1 + (1|plate) + (1|sample)"))
n_boot <- 1000
boot <- lapply(boot_cases, function(cs) {
  m <- tight_fit(cs$formula, read(cs$data), TRUE)
  b <- suppressMessages(suppressWarnings(bootMer(m, boot_stat, nsim = n_boot, seed = 20240607, use.u = FALSE, type = "parametric")))
  t <- b$t
  colnames(t) <- c(sdcor_names(m), names(fixef(m)))
  list(id = cs$id, n = n_boot, names = colnames(t), estimate = unname(b$t0),
       replicates = unname(lapply(seq_len(ncol(t)), function(j) unname(t[, j]))))
})

out <- list(lrtest = lrt, anova_kr = anova_kr, bootstrap = boot, lme4_version = as.character(packageVersion("lme4")),
            lmerTest_version = as.character(packageVersion("lmerTest")), r_version = R.version.string)
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, null = "null", na = "null"), args[2])
