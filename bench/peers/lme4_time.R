#!/usr/bin/env Rscript
# Time lme4::lmer fits on a CSV file, for the lmefast peer benchmarks.
#
# Usage:
#   Rscript lme4_time.R CSVFILE "LME4FORMULA" REML NREPS OUTJSON [FACTORS]
#
#   CSVFILE      data, with a header row (as written by pandas.DataFrame.to_csv
#                with index=False). Character columns are read as factors.
#   LME4FORMULA  e.g. "Reaction ~ Days + (Days | Subject)"
#   REML         TRUE or FALSE
#   NREPS        number of timed fits (after one untimed warm-up fit); 0 means
#                "time the warm-up fit only" (useful for very large models)
#   OUTJSON      where to write the result
#   FACTORS      optional comma-separated column names to force to factors
#                (read.csv turns "4601" into a number even when quoted, so
#                grouping columns that look numeric should be listed here)
#
# The timed region is the whole lmer() call (model frame, formula parsing,
# design construction, optimisation), measured as wall-clock time (Sys.time,
# microsecond resolution). gc() runs before each fit, outside the timed region.
# Output JSON fields: median_s, times, logLik, fixef, REML, nobs, ngrps,
# warnings, messages, versions, ...

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 5) {
  stop("usage: Rscript lme4_time.R CSVFILE LME4FORMULA REML NREPS OUTJSON [FACTORS]")
}
csv_file <- args[[1]]
form <- as.formula(args[[2]])
reml <- as.logical(toupper(args[[3]]))
if (is.na(reml)) stop("REML must be TRUE or FALSE")
nreps <- as.integer(args[[4]])
if (is.na(nreps) || nreps < 0) stop("NREPS must be a non-negative integer")
out_json <- args[[5]]
factors <- if (length(args) >= 6 && nzchar(args[[6]])) {
  strsplit(args[[6]], ",", fixed = TRUE)[[1]]
} else {
  character(0)
}

t_read <- proc.time()[["elapsed"]]
colclasses <- NA
if (length(factors)) {
  header <- names(read.csv(csv_file, nrows = 1, check.names = FALSE))
  colclasses <- setNames(rep(NA_character_, length(header)), header)
  colclasses[intersect(factors, header)] <- "character"
}
dat <- read.csv(csv_file, stringsAsFactors = TRUE, check.names = FALSE,
                colClasses = colclasses)
for (f in intersect(factors, names(dat))) dat[[f]] <- factor(dat[[f]])
read_s <- proc.time()[["elapsed"]] - t_read

warns <- character(0)
msgs <- character(0)
fit_once <- function() {
  withCallingHandlers(
    lmer(form, data = dat, REML = reml),
    warning = function(w) {
      warns <<- unique(c(warns, conditionMessage(w)))
      invokeRestart("muffleWarning")
    },
    message = function(m) {
      msgs <<- unique(c(msgs, trimws(conditionMessage(m))))
      invokeRestart("muffleMessage")
    }
  )
}

timed_fit <- function() {
  gc(verbose = FALSE)
  t0 <- Sys.time()
  fit <- fit_once()
  list(fit = fit, secs = as.numeric(difftime(Sys.time(), t0, units = "secs")))
}

# Warm-up fit: loads/compiles lazily-loaded code, and gives the result we report.
warm <- timed_fit()
fit <- warm$fit
times <- numeric(0)
if (nreps > 0) {
  for (i in seq_len(nreps)) times <- c(times, timed_fit()$secs)
} else {
  times <- warm$secs
}

conv_msgs <- fit@optinfo$conv$lme4$messages
res <- list(
  peer = "lme4",
  median_s = median(times),
  times = times,
  warmup_s = warm$secs,
  warmup_timed = (nreps == 0),
  read_csv_s = read_s,
  logLik = as.numeric(logLik(fit)),
  REML = reml,
  deviance_criterion = unname(if (reml) lme4::REMLcrit(fit) else deviance(fit)),
  fixef = as.list(fixef(fit)),
  theta = as.list(getME(fit, "theta")),
  sigma = sigma(fit),
  nobs = nobs(fit),
  ngrps = as.list(ngrps(fit)),
  singular = isSingular(fit),
  optimizer = fit@optinfo$optimizer,
  feval = fit@optinfo$feval,
  conv_messages = if (is.null(conv_msgs)) list() else as.list(conv_msgs),
  warnings = as.list(warns),
  messages = as.list(msgs),
  formula = args[[2]],
  versions = list(
    R = R.version.string,
    lme4 = as.character(packageVersion("lme4")),
    Matrix = as.character(packageVersion("Matrix")),
    BLAS = unname(extSoftVersion()[["BLAS"]])
  )
)

writeLines(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE), out_json)
