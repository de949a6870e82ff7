# Reference fits from R (lme4, cross-checked with glmmTMB and a direct dense computation) for
# dglmm's HLM-style linear mixed models: REML and ML, group-mean / grand-mean centred
# covariates ("slopes as outcomes", High School and Beyond).
#
# Run from the repository root:
#
#     Rscript benchmarks/r/hlm_reference.R
#
# It writes exactly these files (and nothing else):
#
#   tests/data/hlm/hsb82.csv                   High School and Beyond (mlmRev::Hsb82), 4 columns
#   tests/data/hlm/hlm_reference_fits.json     the fits
#
# It reads (never writes) tests/data/dyestuff.csv, tests/data/sleepstudy.csv and
# tests/data/nested/egsingle.csv.
#
# Requirements (Debian): r-base-core r-cran-lme4 r-cran-glmmtmb r-cran-jsonlite r-cran-mlmrev.
# R is only used to make references: dglmm itself never depends on it.
#
# Every model is fitted by lmer (the reference; bobyqa, rhoend = 1e-10, maxfun = 1e5) and by
# glmmTMB with the same REML setting, on the data as read from the CSV.  The script stops
# (writes no JSON) if a fit fails to converge or is singular, if lme4's logLik() differs by more
# than 1e-6 from a direct dense computation of the (REML or ML) log-likelihood at lme4's
# estimates, or if glmmTMB differs from lme4 by more than 1e-4 in logLik, 0.01 SE in a fixed
# effect or 0.5% in a (co)variance.
#
# `loglik` = as.numeric(logLik(fit)): for REML fits the REML log-likelihood -REMLcrit/2, for ML
# fits the full log-likelihood; both with every constant (the 2 pi terms).
#
# Categorical levels in R are sorted by code point (dglmm's order), so R's first level is
# formulaic's baseline ("Catholic" for sector: R's "sectorPublic" is formulaic's
# "sector[T.Public]").

suppressPackageStartupMessages({
  library(lme4)
  library(glmmTMB)
  library(jsonlite)
  library(mlmRev)
})

stopifnot(file.exists("tests/data/reference_fits.json"))  # run from the repository root
out_dir <- "tests/data/hlm"
dir.create(out_dir, showWarnings = FALSE)
SIG <- 10  # significant digits stored
DIRECT_TOL <- 1e-6  # lme4 logLik vs the direct dense computation
TMB_TOL <- 1e-4     # lme4 logLik vs glmmTMB

# ---------------------------------------------------------------------------------------------
# helpers

sorted_factor <- function(x) {
  # dglmm's default level order: numbers numerically, strings by code point
  if (is.numeric(x)) return(factor(x, levels = sort(unique(x))))
  x <- as.character(x)
  lev <- unique(x)
  lev <- lev[order(sapply(lev, function(s) paste(sprintf("%06d", utf8ToInt(s)), collapse = "")))]
  factor(x, levels = lev)
}

sig <- function(x) signif(x, SIG)
# glmmTMB's results vary from run to run in about the 10th significant digit (its log-likelihood
# by ~1e-10): they are stored rounded so that the file is reproducible -- estimates to
# TMB_SIG significant digits, its differences from lme4 to TMB_DIGITS decimals
TMB_SIG <- 5
TMB_DIGITS <- 7
tsig <- function(x) signif(x, TMB_SIG)
tround <- function(x) round(x, TMB_DIGITS) + 0  # + 0: no negative zero

# write the CSV, read it back (strings stay strings) and return what was read: the fits use
# exactly the numbers in the file
write_and_read <- function(df, name, strings) {
  path <- file.path(out_dir, name)
  write.csv(df, path, row.names = FALSE)
  sz <- file.size(path)
  stopifnot(sz < 2e6)
  message(sprintf("wrote %s (%d rows, %d columns, %d bytes)", path, nrow(df), ncol(df), sz))
  back <- read_csv(path, strings)
  stopifnot(identical(dim(back), dim(df)), identical(names(back), names(df)))
  back
}

read_csv <- function(path, strings) {
  cc <- setNames(rep("character", length(strings)), strings)
  read.csv(path, colClasses = cc)
}

# one entry per grouping factor: terms, sd, corr, covariance (lme4 or glmmTMB VarCorr list);
# `name_map`: R coefficient name -> dglmm (formulaic) name
re_blocks <- function(vc, name_map, rnd = sig) {
  res <- list()
  for (g in names(vc)) {
    m <- vc[[g]]
    cov <- unname(matrix(as.numeric(m), nrow(m)))
    sd <- sqrt(diag(cov))
    corr <- cov / outer(sd, sd)
    terms <- rownames(m)
    stopifnot(all(terms %in% names(name_map)))
    # I(): vectors stay JSON arrays even with one element
    res[[g]] <- list(terms = I(terms), terms_dglmm = I(unname(name_map[terms])),
                     sd = I(rnd(sd)), corr = rnd(corr), covariance = rnd(cov),
                     variance = I(rnd(diag(cov))))
  }
  res
}

check_lme4 <- function(name, fit) {
  msgs <- c(fit@optinfo$conv$lme4$messages, fit@optinfo$warnings)
  bad <- character()
  if (isSingular(fit, tol = 1e-5)) bad <- c(bad, "singular fit")
  if (length(msgs)) bad <- c(bad, paste("convergence:", unlist(msgs)))
  if (fit@optinfo$conv$opt != 0) bad <- c(bad, "optimizer code != 0")
  if (length(bad)) stop(sprintf("%s (lme4): %s", name, paste(bad, collapse = "; ")))
}

check_tmb <- function(name, fit) {
  bad <- character()
  if (fit$fit$convergence != 0) bad <- c(bad, paste("convergence code", fit$fit$convergence,
                                                    fit$fit$message))
  if (!isTRUE(fit$sdr$pdHess)) bad <- c(bad, "Hessian not positive definite")
  vc <- VarCorr(fit)$cond
  for (g in names(vc)) if (any(diag(vc[[g]]) < 1e-8)) bad <- c(bad, "singular (zero variance)")
  if (length(bad)) stop(sprintf("%s (glmmTMB): %s", name, paste(bad, collapse = "; ")))
}

# glmmTMB's outer parameter vector for given beta (ML only: with REML beta is integrated out
# like a random effect and is not an outer parameter), covariance matrices (named as glmmTMB
# names its terms) and residual sd; only scalar and 2 x 2 unstructured blocks are needed here
tmb_par <- function(tfit, beta, covs, sigma) {
  par <- tfit$fit$par
  if (any(names(par) == "beta")) {
    stopifnot(sum(names(par) == "beta") == length(beta))
    par[names(par) == "beta"] <- beta
  }
  theta <- numeric()
  for (g in names(VarCorr(tfit)$cond)) {
    S <- covs[[g]]
    sd <- sqrt(diag(S))
    if (length(sd) == 1) theta <- c(theta, log(sd))
    else if (length(sd) == 2) {
      rho <- S[1, 2] / (sd[1] * sd[2])
      theta <- c(theta, log(sd), rho / sqrt(1 - rho^2))
    } else stop("only 1 x 1 and 2 x 2 blocks handled")
  }
  stopifnot(sum(names(par) == "theta") == length(theta))
  par[names(par) == "theta"] <- theta
  # glmmTMB's (1.1.5) Gaussian dispersion parameter is log(sigma^2) (checked: the mapping must
  # reproduce glmmTMB's own logLik from its own estimates)
  stopifnot(sum(names(par) == "betad") == 1)
  par[names(par) == "betad"] <- 2 * log(sigma)
  par
}

tmb_loglik_at <- function(tfit, beta, covs, sigma) {
  -as.numeric(tfit$obj$fn(tmb_par(tfit, beta, covs, sigma)))
}

covs_of <- function(vc) lapply(vc, function(m) unname(matrix(as.numeric(m), nrow(m))))

# Direct dense computation of the Gaussian log-likelihoods at given variance parameters, not
# using lme4's sparse machinery: the marginal covariance of y is block diagonal over the top
# grouping factor `top`; within a block
#   V = sigma^2 I + sum_k (X_k G_k X_k') * [rows in the same level of factor k]
# (= sigma^2 (I + Z Lambda Lambda' Z')), X_k the model matrix of factor k's random terms
# (`re_design`, built here by model.matrix).  beta is the GLS estimate; returns
#   reml = -1/2 [log det V + log det(X' V^-1 X) + r' V^-1 r + (n - p) log(2 pi)]
#   ml   = -1/2 [log det V + r' V^-1 r + n log(2 pi)]
direct_loglik <- function(data, X, y, re_design, covs, sigma, top) {
  groups <- split(seq_len(nrow(data)), data[[top]], drop = TRUE)
  p <- ncol(X)
  XtVX <- matrix(0, p, p); XtVy <- numeric(p); logdet <- 0
  chols <- vector("list", length(groups))
  Zk <- lapply(names(re_design), function(k) model.matrix(re_design[[k]], data))
  names(Zk) <- names(re_design)
  for (i in seq_along(groups)) {
    idx <- groups[[i]]
    V <- diag(sigma^2, length(idx))
    for (k in names(re_design)) {
      G <- covs[[k]]
      Z <- Zk[[k]][idx, , drop = FALSE]
      stopifnot(ncol(Z) == ncol(G))
      f <- as.character(data[[k]][idx])
      V <- V + (Z %*% G %*% t(Z)) * outer(f, f, "==")
    }
    R <- chol(V)
    chols[[i]] <- R
    logdet <- logdet + 2 * sum(log(diag(R)))
    WX <- backsolve(R, X[idx, , drop = FALSE], transpose = TRUE)
    Wy <- backsolve(R, y[idx], transpose = TRUE)
    XtVX <- XtVX + crossprod(WX)
    XtVy <- XtVy + drop(crossprod(WX, Wy))
  }
  beta <- drop(solve(XtVX, XtVy))
  rVr <- 0
  for (i in seq_along(groups)) {
    idx <- groups[[i]]
    r <- y[idx] - drop(X[idx, , drop = FALSE] %*% beta)
    rVr <- rVr + sum(backsolve(chols[[i]], r, transpose = TRUE)^2)
  }
  n <- length(y)
  ldXVX <- as.numeric(determinant(XtVX, logarithm = TRUE)$modulus)
  list(reml = -0.5 * (logdet + ldXVX + rVr + (n - p) * log(2 * pi)),
       ml = -0.5 * (logdet + rVr + n * log(2 * pi)),
       beta = setNames(beta, colnames(X)))
}

lctrl <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-10, maxfun = 1e5))
# as in nested_reference.R (nlminb's rel.tol below 1e-10 can end in "singular convergence")
tctrl <- glmmTMBControl(optCtrl = list(iter.max = 1e4, eval.max = 1e4, rel.tol = 1e-10,
                                       x.tol = 1e-10))
tctrl_profile <- glmmTMBControl(optCtrl = list(iter.max = 1e4, eval.max = 1e4, rel.tol = 1e-10,
                                               x.tol = 1e-10), profile = TRUE)

cases <- list()

# name_map: R fixed-effect name -> dglmm (formulaic) name, in formulaic's column order
# re_design: grouping factor -> one-sided formula of its random terms (for direct_loglik)
# top: the outermost grouping factor (blocks of V)
fit_case <- function(name, r_formula, dglmm_formula, data, data_file, reml, name_map,
                     re_design, top, note = NULL, extra = NULL) {
  fo <- as.formula(r_formula)
  f <- lmer(fo, data, REML = reml, control = lctrl)
  check_lme4(name, f)
  # (warnings from this first glmmTMB attempt are judged by check_tmb below)
  g <- suppressWarnings(glmmTMB(fo, data, family = gaussian(), REML = reml, control = tctrl))
  tmb_profile <- FALSE
  if (!reml && !isTRUE(g$sdr$pdHess)) {
    # hsb82_ml: nlminb (and optim BFGS) over all parameters stops at a point with a
    # non-positive-definite Hessian; with beta profiled out (profile = TRUE) it converges to
    # lme4's optimum
    message(sprintf("%s: glmmTMB Hessian not positive definite; refitting with profile = TRUE",
                    name))
    tmb_profile <- TRUE
    g <- glmmTMB(fo, data, family = gaussian(), REML = reml, control = tctrl_profile)
  }
  check_tmb(name, g)

  fe <- fixef(f); se <- sqrt(diag(as.matrix(vcov(f))))
  stopifnot(setequal(names(fe), names(name_map)), length(fe) == length(name_map))
  fe_t <- fixef(g)$cond; se_t <- sqrt(diag(vcov(g)$cond))
  stopifnot(identical(names(fe), names(fe_t)))
  vc <- VarCorr(f); vc_t <- VarCorr(g)$cond
  stopifnot(setequal(names(vc), names(vc_t)), setequal(names(vc), names(re_design)))
  for (k in names(vc)) stopifnot(identical(rownames(vc[[k]]),
                                           colnames(model.matrix(re_design[[k]], data))))
  ll <- as.numeric(logLik(f)); ll_t <- as.numeric(logLik(g))
  s_l <- sigma(f); s_t <- sigma(g)
  if (reml) stopifnot(abs(ll - (-REMLcrit(f) / 2)) < 1e-9)
  else stopifnot(abs(ll - (-deviance(f) / 2)) < 1e-9)

  # the direct dense computation at lme4's estimates
  X <- model.matrix(nobars(fo), data)
  stopifnot(identical(colnames(X), names(fe)))
  y <- model.response(model.frame(nobars(fo), data))
  d <- direct_loglik(data, X, y, re_design, covs_of(vc), s_l, top)
  ll_direct <- if (reml) d$reml else d$ml
  direct <- list(
    loglik_direct = sig(ll_direct),
    loglik_direct_diff = sig(ll_direct - ll),
    gls_beta_max_diff_in_se = sig(max(abs(d$beta - fe) / se)))
  stopifnot(abs(ll_direct - ll) < DIRECT_TOL, max(abs(d$beta - fe) / se) < 1e-6)

  # glmmTMB: its own fit, and its objective (Laplace = exact here; with REML, beta integrated
  # out too) at lme4's estimates
  ll_t_self <- tmb_loglik_at(g, fe_t, covs_of(vc_t), s_t)
  stopifnot(abs(ll_t_self - ll_t) < 1e-6)  # the parameter mapping reproduces glmmTMB's value
  ll_t_at_l <- tmb_loglik_at(g, fe, covs_of(vc)[names(vc_t)], s_l)
  cov_l <- covs_of(vc); cov_t <- covs_of(vc_t)[names(vc)]
  rel_var <- max(unlist(lapply(names(vc), function(k) {
    sc <- sqrt(outer(diag(cov_l[[k]]), diag(cov_l[[k]])))
    abs(cov_t[[k]] - cov_l[[k]]) / sc
  })))
  tmb_agree <- list(
    max_fixed_effect_diff_in_se = tround(max(abs(fe_t - fe) / se)),
    max_std_error_rel_diff = tround(max(abs(se_t / se - 1))),
    max_covariance_rel_diff = tround(rel_var),
    residual_variance_rel_diff = tround(s_t^2 / s_l^2 - 1),
    loglik_diff = tround(ll_t - ll),
    tmb_max_abs_gradient = signif(tround(max(abs(g$sdr$gradient.fixed))), 2),
    loglik_tmb_at_lme4_estimates = sig(ll_t_at_l),
    loglik_tmb_at_lme4_estimates_diff = tround(ll_t_at_l - ll))
  stopifnot(max(abs(fe_t - fe) / se) < 0.01, rel_var < 0.005, abs(s_t^2 / s_l^2 - 1) < 0.005,
            abs(ll_t - ll) < TMB_TOL, abs(ll_t_at_l - ll) < TMB_TOL)

  ng <- ngrps(f)
  fl <- getME(f, "flist")
  for (k in names(fl)) stopifnot(ng[[k]] == nlevels(droplevels(fl[[k]])))
  dn <- unname(name_map)  # dglmm order
  rn <- names(name_map)
  rec <- list(
    data = data_file, n_obs = nrow(data),
    r_formula = r_formula, dglmm_formula = dglmm_formula,
    family = "gaussian", link = "identity", reml = reml,
    method = if (reml) "reml" else "ml", reference_engine = "lme4::lmer",
    fixed_effects = as.list(setNames(sig(fe[rn]), dn)),
    std_errors = as.list(setNames(sig(se[rn]), dn)),
    r_fixed_effects = as.list(sig(fe)),
    r_std_errors = as.list(setNames(sig(se), names(fe))),
    fixed_effect_names_dglmm = as.list(name_map[names(fe)]),
    random_effects = re_blocks(vc, name_map),
    n_groups = as.list(setNames(as.integer(ng), names(ng))),
    residual_variance = sig(s_l^2),
    loglik = sig(ll),
    df = as.integer(attr(logLik(f), "df")))
  if (reml) {
    rec$reml_criterion <- sig(REMLcrit(f))
  } else {
    rec$deviance <- sig(deviance(f))
  }
  rec <- c(rec, extra)
  rec$agreement <- c(direct, list(glmmTMB = tmb_agree))
  rec$glmmTMB <- list(
    engine = "glmmTMB", reml = reml, profile = tmb_profile,
    fixed_effects = as.list(setNames(tsig(fe_t[rn]), dn)),
    std_errors = as.list(setNames(tsig(se_t[rn]), dn)),
    random_effects = re_blocks(vc_t[names(vc)], name_map, tsig),
    residual_variance = tsig(s_t^2), loglik = sig(ll_t))
  rec$note <- note
  cases[[name]] <<- rec
  message(sprintf(paste("%-18s logLik %.6f direct diff %.1e | glmmTMB %.6f (at lme4 %.1e);",
                        "max |dbeta|/se %.1e; max cov rel %.1e"), name, ll, ll_direct - ll,
                  ll_t, ll_t_at_l - ll, max(abs(fe_t - fe) / se), rel_var))
}

# ---------------------------------------------------------------------------------------------
# data

# High School and Beyond (mlmRev::Hsb82): maths achievement of 7185 pupils in 160 schools
# (Raudenbush & Bryk).  school as its integer label, sector as a string.
data("Hsb82", package = "mlmRev")
hsb_df <- data.frame(school = as.integer(as.character(Hsb82$school)), mAch = Hsb82$mAch,
                     ses = Hsb82$ses, sector = as.character(Hsb82$sector))
hsb <- write_and_read(hsb_df, "hsb82.csv", "sector")
hsb$sector <- sorted_factor(hsb$sector)
stopifnot(identical(levels(hsb$sector), c("Catholic", "Public")))
hsb$school <- factor(hsb$school)
# group-mean centring, computed from the rows as read (the reference uses these, never
# mlmRev's stored meanses / cses; their differences are recorded)
hsb$meanses <- ave(hsb$ses, hsb$school)
hsb$cses <- hsb$ses - hsb$meanses
stopifnot(all(tapply(hsb$sector, hsb$school, function(v) length(unique(v))) == 1))
meanses_vs_mlmrev <- max(abs(hsb$meanses - Hsb82$meanses))
cses_vs_mlmrev <- max(abs(hsb$cses - Hsb82$cses))
grand_mean_ses <- mean(hsb$ses)
message(sprintf("Hsb82: max |meanses - mlmRev meanses| %.2e, |cses - mlmRev cses| %.2e; grand mean ses %.15g",
                meanses_vs_mlmrev, cses_vs_mlmrev, grand_mean_ses))
hsb_derived <- list(
  meanses = "ave(ses, school): school mean of ses from the rows of hsb82.csv = group_mean(ses)",
  cses = "ses - ave(ses, school) = group_centre(ses)",
  max_abs_diff_meanses_vs_mlmRev = sig(meanses_vs_mlmrev),
  max_abs_diff_cses_vs_mlmRev = sig(cses_vs_mlmrev))

# Dyestuff, sleepstudy (lme4) and egsingle (mlmRev), as already written in tests/data
dye <- read_csv("tests/data/dyestuff.csv", "Batch")
dye$Batch <- factor(dye$Batch)
sleep <- read_csv("tests/data/sleepstudy.csv", "Subject")
sleep$Subject <- factor(sleep$Subject)
eg <- read_csv("tests/data/nested/egsingle.csv", "female")
eg$female <- sorted_factor(eg$female)
eg$schoolid <- factor(eg$schoolid); eg$childid <- factor(eg$childid)
stopifnot(all(tapply(as.character(eg$schoolid), as.character(eg$childid),
                     function(v) length(unique(v))) == 1))  # childid nested in schoolid

# ---------------------------------------------------------------------------------------------
# models

# formulaic's names (formulaic 1.2.2, checked in Python with group_centre/group_mean/grand_centre
# as context functions): interaction columns keep the order written in the formula
hsb_map <- c("(Intercept)" = "Intercept", meanses = "group_mean(ses)",
             sectorPublic = "sector[T.Public]", cses = "group_centre(ses)",
             "meanses:cses" = "group_centre(ses):group_mean(ses)",
             "sectorPublic:cses" = "group_centre(ses):sector[T.Public]")
hsb_r <- paste("mAch ~ 1 + meanses + sector + cses + cses:meanses + cses:sector",
               "+ (1 + cses | school)")
hsb_d <- paste("mAch ~ group_mean(ses) + sector + group_centre(ses)",
               "+ group_centre(ses):group_mean(ses) + group_centre(ses):sector",
               "+ (1 + group_centre(ses) | school)")
hsb_note <- paste("Raudenbush & Bryk's slopes-as-outcomes model; meanses and cses computed in R",
                  "from hsb82.csv (see derived_variables)")
for (reml in c(TRUE, FALSE)) {
  fit_case(if (reml) "hsb82_reml" else "hsb82_ml", hsb_r, hsb_d, hsb, "hlm/hsb82.csv", reml,
           hsb_map, list(school = ~ 1 + cses), "school", note = hsb_note,
           extra = list(derived_variables = hsb_derived))
}

fit_case("hsb82_grand_reml", "mAch ~ 1 + I(ses - mean(ses)) + sector + (1 | school)",
         "mAch ~ grand_centre(ses) + sector + (1 | school)", hsb, "hlm/hsb82.csv", TRUE,
         c("(Intercept)" = "Intercept", "I(ses - mean(ses))" = "grand_centre(ses)",
           sectorPublic = "sector[T.Public]"),
         list(school = ~ 1), "school",
         note = "ses centred at its grand mean over all 7185 rows (grand_mean_ses)",
         extra = list(grand_mean_ses = sig(grand_mean_ses),
                      derived_variables = list(
                        grand_centre = "ses - mean(ses) over all rows = grand_centre(ses)")))

for (reml in c(TRUE, FALSE)) {
  sfx <- if (reml) "_reml" else "_ml"
  fit_case(paste0("dyestuff", sfx), "Yield ~ 1 + (1 | Batch)", "Yield ~ 1 + (1 | Batch)",
           dye, "dyestuff.csv", reml, c("(Intercept)" = "Intercept"), list(Batch = ~ 1),
           "Batch")
  fit_case(paste0("sleepstudy", sfx), "Reaction ~ Days + (Days | Subject)",
           "Reaction ~ Days + (1 + Days | Subject)", sleep, "sleepstudy.csv", reml,
           c("(Intercept)" = "Intercept", Days = "Days"), list(Subject = ~ Days), "Subject")
  fit_case(paste0("egsingle", sfx),
           "math ~ year + female + black + hispanic + retained + (year | childid) + (1 | schoolid)",
           "math ~ year + female + black + hispanic + retained + (1 + year | childid) + (1 | schoolid)",
           eg, "nested/egsingle.csv", reml,
           c("(Intercept)" = "Intercept", year = "year", femaleMale = "female[T.Male]",
             black = "black", hispanic = "hispanic", retained = "retained"),
           list(childid = ~ year, schoolid = ~ 1), "schoolid",
           note = if (!reml) paste("the model of nested_reference_fits.json's",
                                   "egsingle_gaussian_slope_ml (there with rhoend = 1e-9)"))
}

# ---------------------------------------------------------------------------------------------
# write

versions <- list(R = R.version.string, lme4 = as.character(packageVersion("lme4")),
                 glmmTMB = as.character(packageVersion("glmmTMB")),
                 TMB = as.character(packageVersion("TMB")),
                 mlmRev = as.character(packageVersion("mlmRev")),
                 Matrix = as.character(packageVersion("Matrix")),
                 minqa = as.character(packageVersion("minqa")))
out <- list(
  `_about` = paste("HLM-style linear mixed model reference fits (REML and ML), written by",
                   "benchmarks/r/hlm_reference.R; see tests/data/HLM_REFERENCE.md.",
                   "Reference = lme4::lmer; data paths relative to tests/data;",
                   "fixed_effects keyed by dglmm (formulaic) names, r_fixed_effects by R's."),
  `_versions` = versions,
  `_settings` = list(lmer = "lmerControl(optimizer = 'bobyqa', optCtrl = list(rhoend = 1e-10, maxfun = 1e5))",
                     glmmTMB = "glmmTMBControl(optCtrl = list(iter.max = 1e4, eval.max = 1e4, rel.tol = 1e-10, x.tol = 1e-10))",
                     direct_tolerance = DIRECT_TOL, glmmTMB_loglik_tolerance = TMB_TOL,
                     stored_significant_digits = SIG, glmmTMB_stored_significant_digits = TMB_SIG,
                     glmmTMB_agreement_stored_decimals = TMB_DIGITS),
  cases = cases)
path <- file.path(out_dir, "hlm_reference_fits.json")
writeLines(toJSON(out, auto_unbox = TRUE, pretty = TRUE, digits = NA, null = "null"), path)
message(sprintf("\n%d cases written to %s", length(cases), path))
print(versions)
