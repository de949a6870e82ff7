# Time lme4::glmer and glmmTMB on one CSV (used by benchmarks/run.py).
#
#     Rscript benchmarks/r/time_fits.R data.csv "<formula>" n_agq [glmer|glmmTMB|both]
#
# Prints one JSON object on stdout:
#   {"n_rows":..., "fits": {"glmer": {"seconds":..., "loglik":..., "fixed_effects": {...},
#    "covariance": [[...]], "converged": ...}, "glmmTMB": {...}}}
# seconds is the wall time of the fitting call alone (reading the CSV is not counted).
# The formula uses dglmm/formulaic syntax for the fixed part; C(plan) is rewritten as
# factor(plan) with dglmm's (sorted) level order, and fixed-effect names are translated to
# formulaic's ("(Intercept)" -> "Intercept", "factor(plan)postpaid" -> "C(plan)[T.postpaid]").
# glmmTMB has no adaptive quadrature: it is only run for n_agq == 1.
# Bernoulli responses: every log-likelihood constant is zero, so logLik() of both packages is
# the full log-likelihood dglmm reports (also for glmer with nAGQ > 1).

suppressPackageStartupMessages({
  library(lme4)
  library(glmmTMB)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 3) stop("usage: time_fits.R data.csv formula n_agq [glmer|glmmTMB|both]")
path <- args[1]
formula_text <- args[2]
n_agq <- as.integer(args[3])
which_fits <- if (length(args) >= 4) args[4] else "both"

d <- read.csv(path, stringsAsFactors = FALSE)
factors <- regmatches(formula_text, gregexpr("C\\(([A-Za-z_.][A-Za-z0-9_.]*)\\)", formula_text))[[1]]
for (f in unique(factors)) {
  v <- sub("C\\((.*)\\)", "\\1", f)
  d[[v]] <- factor(d[[v]], levels = sort(unique(d[[v]]), method = "radix"))
}
r_formula <- gsub("C\\(([A-Za-z_.][A-Za-z0-9_.]*)\\)", "\\1", formula_text)
fml <- as.formula(r_formula)

rename <- function(nm) {
  nm <- sub("^\\(Intercept\\)$", "Intercept", nm)
  for (f in unique(factors)) {
    v <- sub("C\\((.*)\\)", "\\1", f)
    for (lev in levels(d[[v]])) {
      nm <- gsub(paste0("\\b", v, lev, "\\b"), paste0("C(", v, ")[T.", lev, "]"), nm)
    }
  }
  nm
}

fixed_list <- function(b) {
  b <- as.list(b)
  names(b) <- rename(names(b))
  b
}

out <- list(n_rows = nrow(d), n_groups = NA, fits = list())

if (which_fits %in% c("glmer", "both")) {
  t0 <- proc.time()[["elapsed"]]
  m <- tryCatch(
    glmer(fml, data = d, family = binomial, nAGQ = n_agq,
          control = glmerControl(calc.derivs = TRUE)),
    error = function(e) e
  )
  secs <- proc.time()[["elapsed"]] - t0
  if (inherits(m, "error")) {
    out$fits$glmer <- list(seconds = secs, error = conditionMessage(m))
  } else {
    vc <- VarCorr(m)[[1]]
    out$fits$glmer <- list(
      seconds = secs,
      loglik = as.numeric(logLik(m)),
      fixed_effects = fixed_list(fixef(m)),
      covariance = unname(as.matrix(vc)),
      converged = is.null(m@optinfo$conv$lme4$messages),
      messages = as.list(m@optinfo$conv$lme4$messages),
      version = as.character(packageVersion("lme4"))
    )
    out$n_groups <- as.integer(ngrps(m)[[1]])
  }
}

if (which_fits %in% c("glmmTMB", "both") && n_agq == 1) {
  t0 <- proc.time()[["elapsed"]]
  m <- tryCatch(glmmTMB(fml, data = d, family = binomial), error = function(e) e)
  secs <- proc.time()[["elapsed"]] - t0
  if (inherits(m, "error")) {
    out$fits$glmmTMB <- list(seconds = secs, error = conditionMessage(m))
  } else {
    vc <- VarCorr(m)$cond[[1]]
    out$fits$glmmTMB <- list(
      seconds = secs,
      loglik = as.numeric(logLik(m)),
      fixed_effects = fixed_list(fixef(m)$cond),
      covariance = unname(matrix(as.numeric(vc), nrow = nrow(vc))),
      converged = isTRUE(m$sdr$pdHess) && m$fit$convergence == 0,
      version = as.character(packageVersion("glmmTMB"))
    )
  }
}

cat(toJSON(out, auto_unbox = TRUE, digits = 12, null = "null", na = "null"), "\n")
