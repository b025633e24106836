# Writes lme4's InstEval data set (73,421 ratings; 2,972 students s x 1,128 instructors d)
# to InstEval.csv for the crossed-effects benchmark: Rscript export_insteval.R
library(lme4)
data(InstEval)
write.csv(InstEval[, c("s", "d", "service", "dept", "studage", "lectage", "y")],
          "InstEval.csv", row.names = FALSE)
