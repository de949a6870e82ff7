# Reference fits from R for dglmm's first-order PQL (penalized quasi-likelihood, as
# MASS::glmmPQL), with lme4's Laplace fit of the same model for comparison.
#
# Run from the repository root:
#
#     Rscript benchmarks/r/pql_reference.R
#
# It writes exactly these files (and nothing else):
#
#   tests/data/pql/{bacteria,cbpp,grouseticks}.csv   the data (as fitted: read back from the CSV)
#   tests/data/pql/pql_reference.json                the fits
#
# Requirements (Debian): r-base-core r-cran-lme4 r-cran-jsonlite r-cran-mass (nlme comes with R).
# R is only used to make references: dglmm itself never depends on it.
#
# What glmmPQL does (MASS 7.3-58, read from its source, checked below at run time):
#   * start: glm() of the same model; working response z = eta + (y - mu) / mu'(eta), working
#     weights W = w mu'(eta)^2 / V(mu) (w = prior weights, the binomial trials);
#   * each iteration fits the LINEAR mixed model  z = X beta + Z b + e,  e ~ N(0, sigma^2 / W)
#     with nlme::lme(method = "ML", weights = varFixed(~ 1 / W)): the residual scale sigma is
#     ESTIMATED (not fixed at 1), and the variance components are ML (not REML) estimates;
#   * updates eta = X beta + Z b (fitted(fit), the conditional fitted values), z and W, and stops
#     when sum((eta - eta_old)^2) < 1e-6 sum(eta^2) (a hard-wired, fairly loose criterion) or
#     after `niter` iterations.  glmmPQL reports neither the iteration count nor convergence;
#     they are counted here from its "iteration i" messages and by re-checking the criterion.
#   * The standard errors (summary(fit)$tTable) are lme's, i.e. they include the estimated sigma.
#
# Two PQL fits are stored per case:
#   glmmPQL        MASS::glmmPQL itself (niter = 100, tight lmeControl), with its own stopping rule;
#   pql_tight      the same iteration written out here (checked to reproduce glmmPQL to 1e-8 with
#                  glmmPQL's rule), iterated to a tight fixed point: max |eta - eta_old| < 1e-10.
#                  Use this one for tight numerical comparisons.
#   pql_tight_sigma1  the same with the working residual scale FIXED at 1 (lmeControl(sigma = 1);
#                  Breslow & Clayton's PQL without a dispersion parameter).
# Then `laplace`: lme4::glmer(nAGQ = 1) of the same model (logLik = full log-likelihood).
#
# Factor levels: the primary fits use R's default level order (for bacteria: trt = placebo, drug,
# drug+, as in the MASS book).  dglmm sorts levels naturally (drug, drug+, placebo), so for any
# case where the two orders differ, the same fits are repeated in dglmm's order under
# `natural_level_order` (formula `formula_dglmm`, names `fixed_effect_names_dglmm`).

suppressPackageStartupMessages({
  library(MASS)
  library(nlme)
  library(lme4)
  library(jsonlite)
})

stopifnot(file.exists("tests/data/reference_fits.json"))  # run from the repository root
out_dir <- "tests/data/pql"
dir.create(out_dir, showWarnings = FALSE, recursive = TRUE)
SIG <- 10
sig <- function(x) signif(x, SIG)

NITER <- 100
LME_CTRL <- lmeControl(maxIter = 200, msMaxIter = 200, niterEM = 100, tolerance = 1e-10,
                       msTol = 1e-12, returnObject = FALSE)
GLMER_CTRL <- glmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-9, maxfun = 1e5),
                           tolPwrss = 1e-12)

# ---------------------------------------------------------------------------------------------
# glmmPQL's lme method and scale, read from its source

src <- paste(deparse(MASS::glmmPQL), collapse = "\n")
lme_method <- regmatches(src, regexpr('mcall\\$method <- "[A-Z]+"', src))
stopifnot(length(lme_method) == 1)
lme_method <- sub('.*"([A-Z]+)"', "\\1", lme_method)
stopifnot(grepl("varFixed(~invwt)", src, fixed = TRUE),
          grepl("sum((eta - etaold)^2) < 1e-06 * sum(eta^2)", src, fixed = TRUE))
message("glmmPQL calls lme with method = \"", lme_method, "\"")

# ---------------------------------------------------------------------------------------------
# data: export, read back, fit on what was read back

natural_order <- function(x) {
  # dglmm's level order (design._natural_key): numbers numerically, strings in natural order
  x <- unique(as.character(x))
  if (all(grepl("^-?[0-9]+(\\.[0-9]+)?$", x))) return(x[order(as.numeric(x))])
  key <- function(s) {
    parts <- regmatches(s, gregexpr("[0-9]+|[^0-9]+", s))[[1]]
    paste(vapply(parts, function(p) if (grepl("^[0-9]+$", p)) sprintf("1%020d", as.numeric(p))
                 else paste0("0", paste(sprintf("%06d", utf8ToInt(p)), collapse = "")), ""),
          collapse = "|")
  }
  x[order(vapply(x, key, ""))]
}

write_and_read <- function(df, name, strings) {
  path <- file.path(out_dir, name)
  write.csv(df, path, row.names = FALSE)
  sz <- file.size(path)
  stopifnot(sz < 2e5)
  message(sprintf("wrote %s (%d rows, %d columns, %d bytes)", path, nrow(df), ncol(df), sz))
  cc <- setNames(rep("character", length(strings)), strings)
  back <- read.csv(path, colClasses = cc)
  stopifnot(identical(dim(back), dim(df)), identical(names(back), names(df)))
  back
}

# bacteria (MASS): presence of H. influenzae, 50 children, weeks 0, 2, 4, 6, 11
b <- MASS::bacteria
bacteria_df <- data.frame(y = as.integer(b$y == "y"), ap = as.character(b$ap),
                          hilo = as.character(b$hilo), week = as.integer(b$week),
                          ID = as.character(b$ID), trt = as.character(b$trt),
                          week2 = as.integer(b$week > 2), stringsAsFactors = FALSE)
stopifnot(all(levels(b$trt) == c("placebo", "drug", "drug+")), levels(b$y)[2] == "y")

# cbpp (lme4)
cb <- lme4::cbpp
cbpp_df <- data.frame(herd = as.character(cb$herd), incidence = as.integer(cb$incidence),
                      size = as.integer(cb$size), period = as.character(cb$period),
                      stringsAsFactors = FALSE)

# grouseticks (lme4): HEIGHT centred at its mean over the 403 rows
gt <- lme4::grouseticks
grouse_df <- data.frame(INDEX = as.character(gt$INDEX), TICKS = as.integer(gt$TICKS),
                        BROOD = as.character(gt$BROOD), HEIGHT = as.numeric(gt$HEIGHT),
                        HEIGHT_c = as.numeric(scale(gt$HEIGHT, scale = FALSE)),
                        YEAR = as.character(gt$YEAR), LOCATION = as.character(gt$LOCATION),
                        stringsAsFactors = FALSE)

# ---------------------------------------------------------------------------------------------
# fitting

# PQL written out (the loop of MASS::glmmPQL 7.3-58, random intercept, no offset), with a
# selectable stopping rule
pql_loop <- function(fixed, random, family, data, rule = c("glmmPQL", "tight"), maxit = 500,
                     ctrl = LME_CTRL) {
  rule <- match.arg(rule)
  fit0 <- glm(fixed, family = family, data = data)
  w <- fit0$prior.weights
  eta <- fit0$linear.predictors
  mf <- data
  mf$zz <- eta + fit0$residuals
  mf$invwt <- 1 / fit0$weights
  fx <- fixed
  fx[[2L]] <- quote(zz)
  converged <- FALSE
  for (i in seq_len(maxit)) {
    fit <- lme(fx, random = random, data = mf, method = lme_method,
               weights = varFixed(~invwt), control = ctrl)
    etaold <- eta
    eta <- as.numeric(fitted(fit))
    crit <- if (rule == "glmmPQL") sum((eta - etaold)^2) < 1e-06 * sum(eta^2)
            else max(abs(eta - etaold)) < 1e-10
    if (crit) { converged <- TRUE; break }
    mu <- family$linkinv(eta)
    mu.eta.val <- family$mu.eta(eta)
    mf$zz <- eta + (fit0$y - mu) / mu.eta.val
    mf$invwt <- 1 / (w * mu.eta.val^2 / family$variance(mu))
  }
  list(fit = fit, iterations = i, converged = converged,
       last_max_abs_eta_change = max(abs(eta - etaold)))
}

lme_summary <- function(fit) {
  tt <- summary(fit)$tTable
  vc <- VarCorr(fit)
  stopifnot(abs(sqrt(as.numeric(getVarCov(fit)[1, 1])) - as.numeric(vc[1, "StdDev"])) < 1e-4)
  list(fixed_effects = as.list(sig(fixef(fit))),
       std_errors = as.list(sig(setNames(tt[, "Std.Error"], rownames(tt)))),
       t_table = list(columns = I(colnames(tt)), rows = I(rownames(tt)),
                      values = sig(unname(as.matrix(tt)))),
       fixed_effect_covariance = sig(unname(as.matrix(fit$varFix))),
       # VarCorr() of an lme fit is a character matrix rounded for printing: the full-precision
       # value is taken from getVarCov(); random_intercept_sd_varcorr is VarCorr()'s string
       random_intercept_sd = sig(sqrt(as.numeric(getVarCov(fit)[1, 1]))),
       random_intercept_variance = sig(as.numeric(getVarCov(fit)[1, 1])),
       random_intercept_sd_varcorr = as.numeric(vc[1, "StdDev"]),
       residual_sd = sig(fit$sigma),
       lme_method = fit$method,
       n_groups = as.integer(fit$dims$ngrps[1]))
}

fit_case <- function(fixed, random, fixed_glmer, family, data) {
  # 1. MASS::glmmPQL, counting its iterations from its messages
  n_msg <- 0L
  env <- environment()
  g <- withCallingHandlers(
    glmmPQL(fixed, random = random, family = family, data = data, niter = NITER,
            control = LME_CTRL, verbose = TRUE),
    message = function(m) {
      if (grepl("^iteration [0-9]+", conditionMessage(m))) assign("n_msg", n_msg + 1L, envir = env)
      invokeRestart("muffleMessage")
    })
  # 2. the same loop written out: glmmPQL's rule (must reproduce glmmPQL), then tight
  same <- pql_loop(fixed, random, family, data, "glmmPQL", maxit = NITER)
  stopifnot(same$iterations == n_msg,
            max(abs(fixef(same$fit) - fixef(g))) < 1e-8,
            abs(same$fit$sigma - g$sigma) < 1e-8)
  tight <- pql_loop(fixed, random, family, data, "tight", maxit = 500)
  if (!tight$converged) stop("tight PQL did not converge")
  ctrl1 <- LME_CTRL
  ctrl1$sigma <- 1
  tight1 <- pql_loop(fixed, random, family, data, "tight", maxit = 500, ctrl = ctrl1)
  if (!tight1$converged) stop("tight PQL (sigma = 1) did not converge")
  stopifnot(abs(tight1$fit$sigma - 1) < 1e-12)
  # 3. Laplace
  lap <- glmer(fixed_glmer, family = family, data = data, nAGQ = 1, control = GLMER_CTRL)
  msgs <- lap@optinfo$conv$lme4$messages
  if (!is.null(msgs)) stop("glmer: ", paste(msgs, collapse = "; "))
  lap_se <- sqrt(diag(as.matrix(vcov(lap))))
  glmmpql <- c(lme_summary(g),
               list(iterations = n_msg, niter = NITER, converged = same$converged,
                    last_max_abs_eta_change = sig(same$last_max_abs_eta_change),
                    stopping_rule = "sum((eta - eta_old)^2) < 1e-6 * sum(eta^2)"))
  pql_tight <- c(lme_summary(tight$fit),
                 list(iterations = tight$iterations, converged = tight$converged,
                      last_max_abs_eta_change = sig(tight$last_max_abs_eta_change),
                      stopping_rule = "max |eta - eta_old| < 1e-10"))
  pql_tight_sigma1 <- c(lme_summary(tight1$fit),
                        list(iterations = tight1$iterations, converged = tight1$converged,
                             last_max_abs_eta_change = sig(tight1$last_max_abs_eta_change),
                             stopping_rule = "max |eta - eta_old| < 1e-10",
                             note = "lmeControl(sigma = 1): residual scale fixed at 1"))
  laplace <- list(engine = "lme4::glmer", n_agq = 1L,
                  fixed_effects = as.list(sig(fixef(lap))),
                  std_errors = as.list(sig(setNames(lap_se, names(fixef(lap))))),
                  random_intercept_sd = sig(as.numeric(attr(VarCorr(lap)[[1]], "stddev"))),
                  loglik = sig(as.numeric(logLik(lap))),
                  deviance = sig(deviance(lap)))
  list(glmmPQL = glmmpql, pql_tight = pql_tight, pql_tight_sigma1 = pql_tight_sigma1,
       laplace = laplace)
}

# names dglmm gives the coefficients (R name -> dglmm name)
dglmm_names <- function(rnames, factors, wrapped, numeric_map = list()) {
  vapply(rnames, function(nm) {
    if (nm == "(Intercept)") return("Intercept")
    if (!is.null(numeric_map[[nm]])) return(numeric_map[[nm]])
    for (v in factors) if (startsWith(nm, v)) {
      lev <- substring(nm, nchar(v) + 1)
      return(sprintf("%s[T.%s]", if (v %in% wrapped) sprintf("C(%s)", v) else v, lev))
    }
    nm
  }, "")
}

cases <- list()
case <- function(name, file, df, strings, factors, prep, fixed, random, fixed_glmer,
                 family, formula_r, formula_dglmm, wrapped, numeric_map, trials = NULL,
                 note = NULL, formula_dglmm_r_levels = NULL, r_level_spelling = list()) {
  back <- write_and_read(df, file, strings)
  r_order <- prep(back, natural = FALSE)
  res <- fit_case(fixed, random, fixed_glmer, family, r_order)
  entry <- list(data_file = file.path("pql", file), n_obs = nrow(back),
                family = family$family, link = family$link,
                formula_r = formula_r, formula_glmer = deparse(fixed_glmer),
                formula_dglmm = formula_dglmm, trials = trials,
                categorical_columns = I(factors),
                levels_r = lapply(setNames(factors, factors), function(v) I(levels(r_order[[v]]))))
  entry <- c(entry, res)
  nat <- prep(back, natural = TRUE)
  differs <- any(vapply(factors, function(v) !identical(levels(nat[[v]]), levels(r_order[[v]])),
                        TRUE))
  if (differs) {
    rn <- fit_case(fixed, random, fixed_glmer, family, nat)
    rn$levels <- lapply(setNames(factors, factors), function(v) I(levels(nat[[v]])))
    rn$fixed_effect_names_r <- I(names(rn$pql_tight$fixed_effects))
    rn$fixed_effect_names_dglmm <- as.list(dglmm_names(names(rn$pql_tight$fixed_effects),
                                                       factors, wrapped, numeric_map))
    entry$natural_level_order <- rn
    # top-level fits in dglmm: the factor wrapped in C(f, levels=[R's order])
    rl <- dglmm_names(names(res$pql_tight$fixed_effects), factors, character(), numeric_map)
    for (v in names(r_level_spelling))
      rl <- sub(paste0("^", v, "\\[T\\."), paste0(r_level_spelling[[v]], "[T."), rl)
    entry$formula_dglmm_r_levels <- formula_dglmm_r_levels
    entry$fixed_effect_names_dglmm_r_levels <- as.list(rl)
    entry$note_levels <- paste("R's level order differs from dglmm's natural order; the",
                               "top-level fits use R's order, `natural_level_order` dglmm's.")
  } else {
    entry$fixed_effect_names_dglmm <- as.list(dglmm_names(names(res$pql_tight$fixed_effects),
                                                          factors, wrapped, numeric_map))
  }
  if (!is.null(note)) entry$note <- note
  cases[[name]] <<- entry
  p <- res$pql_tight; l <- res$laplace
  message(sprintf("%s: PQL %s | sd %.4f sigma %.4f (glmmPQL %d it, tight %d it)\n   Laplace %s | sd %.4f logLik %.4f",
                  name, paste(sprintf("%.4f", unlist(p$fixed_effects)), collapse = " "),
                  p$random_intercept_sd, p$residual_sd, res$glmmPQL$iterations, p$iterations,
                  paste(sprintf("%.4f", unlist(l$fixed_effects)), collapse = " "),
                  l$random_intercept_sd, l$loglik))
}

fac <- function(x, natural, r_levels) factor(x, levels = if (natural) natural_order(x) else r_levels)

case("bacteria", "bacteria.csv", bacteria_df, c("ap", "hilo", "ID", "trt"), c("trt"),
     function(d, natural) {
       d$trt <- fac(d$trt, natural, c("placebo", "drug", "drug+"))
       d$ID <- factor(d$ID, levels = natural_order(d$ID))
       d
     },
     y ~ trt + I(week > 2), ~ 1 | ID, y ~ trt + I(week > 2) + (1 | ID), binomial(),
     "glmmPQL(y ~ trt + I(week > 2), random = ~ 1 | ID, family = binomial, data = bacteria)",
     "y ~ trt + week2 + (1 | ID)", character(), list("I(week > 2)TRUE" = "week2"),
     note = paste("y = 1 if H. influenzae present (bacteria$y == 'y'); week2 = as.integer(week > 2)",
                  "(R's coefficient I(week > 2)TRUE).  The top-level fits (placebo baseline) are",
                  "`formula_dglmm_r_levels` in dglmm; `formula_dglmm` (drug baseline) is",
                  "`natural_level_order`."),
     formula_dglmm_r_levels = "y ~ C(trt, levels=['placebo', 'drug', 'drug+']) + week2 + (1 | ID)",
     r_level_spelling = list(trt = "C(trt, levels=['placebo', 'drug', 'drug+'])"))

case("cbpp", "cbpp.csv", cbpp_df, c("herd", "period"), c("period"),
     function(d, natural) {
       d$period <- fac(d$period, natural, as.character(1:4))
       d$herd <- factor(d$herd, levels = natural_order(d$herd))
       d
     },
     cbind(incidence, size - incidence) ~ period, ~ 1 | herd,
     cbind(incidence, size - incidence) ~ period + (1 | herd), binomial(),
     "glmmPQL(cbind(incidence, size - incidence) ~ period, random = ~ 1 | herd, family = binomial, data = cbpp)",
     "incidence ~ C(period) + (1 | herd)", c("period"), list(), trials = "size",
     note = "binomial with trials `size`; period is 1..4 (read as integers by pandas, hence C(period)).")

case("grouseticks", "grouseticks.csv", grouse_df, c("INDEX", "BROOD", "YEAR", "LOCATION"),
     c("YEAR"),
     function(d, natural) {
       d$YEAR <- fac(d$YEAR, natural, c("95", "96", "97"))
       d$BROOD <- factor(d$BROOD, levels = natural_order(d$BROOD))
       d
     },
     TICKS ~ YEAR + HEIGHT_c, ~ 1 | BROOD, TICKS ~ YEAR + HEIGHT_c + (1 | BROOD), poisson(),
     "glmmPQL(TICKS ~ YEAR + HEIGHT_c, random = ~ 1 | BROOD, family = poisson, data = grouseticks)",
     "TICKS ~ C(YEAR) + HEIGHT_c + (1 | BROOD)", c("YEAR"), list(),
     note = paste("HEIGHT_c = HEIGHT - mean(HEIGHT) over all 403 rows (scale(HEIGHT, scale = FALSE));",
                  "YEAR is 95, 96, 97 (integers to pandas, hence C(YEAR))."))

out <- list(
  description = paste("First-order PQL (MASS::glmmPQL) reference fits, with lme4 Laplace fits of the",
                      "same models; made by benchmarks/r/pql_reference.R"),
  glmmPQL_lme_method = lme_method,
  glmmPQL_working_model = paste0("lme(z ~ X, random, method = '", lme_method, "', weights = ",
                                 "varFixed(~ 1/W)): Var(e_i) = sigma^2 / W_i with sigma estimated ",
                                 "(residual_sd, not fixed at 1); W = prior weight * mu'(eta)^2 / V(mu)"),
  glmmPQL_stopping_rule = "sum((eta - eta_old)^2) < 1e-6 * sum(eta^2), eta = conditional linear predictor",
  lme_control = list(maxIter = 200, msMaxIter = 200, niterEM = 100, tolerance = 1e-10, msTol = 1e-12),
  glmer_control = "glmerControl(optimizer = 'bobyqa', optCtrl = list(rhoend = 1e-9, maxfun = 1e5), tolPwrss = 1e-12)",
  R_version = R.version.string,
  packages = list(MASS = as.character(packageVersion("MASS")),
                  nlme = as.character(packageVersion("nlme")),
                  lme4 = as.character(packageVersion("lme4")),
                  Matrix = as.character(packageVersion("Matrix")),
                  jsonlite = as.character(packageVersion("jsonlite"))),
  significant_digits = SIG,
  cases = cases)
path <- file.path(out_dir, "pql_reference.json")
writeLines(toJSON(out, auto_unbox = TRUE, pretty = TRUE, digits = NA, null = "null"), path)
message("wrote ", path)
