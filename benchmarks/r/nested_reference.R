# Reference fits from R (lme4 and glmmTMB) for dglmm's NESTED (multilevel) models, issue 10.
#
# Run from the repository root:
#
#     Rscript benchmarks/r/nested_reference.R
#
# It writes exactly these files (and nothing else):
#
#   tests/data/nested/{guimmun,grouseticks,cbpp_obs,egsingle}.csv   the data (needed columns only)
#   tests/data/nested/nested_reference_fits.json                    the fits
#
# Requirements (Debian): r-base-core r-cran-lme4 r-cran-glmmtmb r-cran-jsonlite r-cran-mlmrev.
# R is only used to make references: dglmm itself never depends on it.
#
# Every model is fitted twice, by glmer/lmer and by glmmTMB (Laplace; maximum likelihood for the
# Gaussian model), on the data read back from the CSV just written.  The glmer/lmer fit is the
# reference; the glmmTMB fit is stored beside it together with the largest differences between the
# two.  The script stops (writes nothing) if a fit fails to converge, is singular, or if the two
# packages disagree by more than 0.01 SE on a fixed effect, 0.5% on a variance or 1e-4 on logLik.
#
# `loglik` is the full log-likelihood with all constants (log binomial coefficients, log y!).
# glmer's Laplace logLik() and glmmTMB's logLik() both include them; this is checked by
# evaluating glmmTMB's Laplace objective (TMB's obj$fn) AT lme4's estimates and comparing it with
# lme4's logLik() (`agreement$loglik_tmb_at_lme4_estimates_diff`).
#
# Categorical levels in R are put in the order dglmm uses (sorted by code point), so that the
# coefficient names map one to one (`fixed_effect_names_dglmm`).

suppressPackageStartupMessages({
  library(lme4)
  library(glmmTMB)
  library(jsonlite)
  library(mlmRev)
})

stopifnot(file.exists("tests/data/reference_fits.json"))  # run from the repository root
out_dir <- "tests/data/nested"
dir.create(out_dir, showWarnings = FALSE)
SIG <- 10  # significant digits stored

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

# write the CSV, read it back (strings stay strings) and return what was read: the fits use
# exactly the numbers in the file
write_and_read <- function(df, name, strings) {
  path <- file.path(out_dir, name)
  write.csv(df, path, row.names = FALSE)
  sz <- file.size(path)
  stopifnot(sz < 2e6)
  message(sprintf("wrote %s (%d rows, %d columns, %d bytes)", path, nrow(df), ncol(df), sz))
  cc <- setNames(rep("character", length(strings)), strings)
  back <- read.csv(path, colClasses = cc)
  stopifnot(identical(dim(back), dim(df)), identical(names(back), names(df)))
  back
}

# R coefficient name -> formulaic column name.  `fac`: variable -> how the dglmm formula writes
# it (e.g. "C(YEAR)" or "kid2p"); its levels are taken from the data.
map_names <- function(rnames, fac, data) {
  map_one <- function(part) {
    if (part == "(Intercept)") return("Intercept")
    for (v in names(fac)) {
      if (startsWith(part, v)) {
        rest <- substring(part, nchar(v) + 1)
        if (rest %in% levels(data[[v]])) return(sprintf("%s[T.%s]", fac[[v]], rest))
      }
    }
    part
  }
  vapply(rnames, function(nm) {
    paste(vapply(strsplit(nm, ":", fixed = TRUE)[[1]], map_one, ""), collapse = ":")
  }, "")
}

# one entry per grouping factor: terms, sd, corr, covariance (lme4 or glmmTMB VarCorr list)
re_blocks <- function(vc, fe_map) {
  res <- list()
  for (g in names(vc)) {
    m <- vc[[g]]
    cov <- unname(matrix(as.numeric(m), nrow(m)))
    sd <- sqrt(diag(cov))
    corr <- cov / outer(sd, sd)
    terms <- rownames(m)
    # I(): vectors stay JSON arrays even with one element
    res[[g]] <- list(terms = I(terms),
                     terms_dglmm = I(unname(map_names(terms, fe_map$fac, fe_map$data))),
                     sd = I(sig(sd)), corr = sig(corr), covariance = sig(cov),
                     variance = I(sig(diag(cov))))
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

# glmmTMB's outer parameter vector for given beta, covariance matrices (named as glmmTMB names
# its terms) and residual sd; only scalar and 2 x 2 unstructured blocks are needed here
tmb_par <- function(tfit, beta, covs, sigma = NULL) {
  par <- tfit$fit$par
  stopifnot(sum(names(par) == "beta") == length(beta))
  par[names(par) == "beta"] <- beta
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
  if (!is.null(sigma)) {
    # glmmTMB's (1.1.5) Gaussian dispersion parameter is log(sigma^2) (checked: the mapping
    # must reproduce glmmTMB's own logLik from its own estimates)
    stopifnot(sum(names(par) == "betad") == 1)
    par[names(par) == "betad"] <- 2 * log(sigma)
  }
  par
}

tmb_loglik_at <- function(tfit, beta, covs, sigma = NULL) {
  -as.numeric(tfit$obj$fn(tmb_par(tfit, beta, covs, sigma)))
}

covs_of <- function(vc) lapply(vc, function(m) unname(matrix(as.numeric(m), nrow(m))))

gctrl <- glmerControl(optimizer = "bobyqa", tolPwrss = 1e-12,
                      optCtrl = list(rhoend = 1e-9, maxfun = 1e5))
lctrl <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-9, maxfun = 1e5))
# nlminb's rel.tol below 1e-10 ends in "singular convergence (7)" at the same optimum (guImmun)
tctrl <- glmmTMBControl(optCtrl = list(iter.max = 1e4, eval.max = 1e4, rel.tol = 1e-10,
                                       x.tol = 1e-10))

cases <- list()

fit_case <- function(name, formula_lme4, formula_dglmm, data, data_file, family, link,
                     fac = list(), trials = NULL, note = NULL) {
  fo <- as.formula(formula_lme4)
  gaussian_ml <- family == "gaussian"
  fam <- switch(family, binomial = binomial(link = link), poisson = poisson(link = link),
                gaussian = gaussian())
  t0 <- proc.time()[["elapsed"]]
  f <- if (gaussian_ml) lmer(fo, data, REML = FALSE, control = lctrl)
       else glmer(fo, data, fam, control = gctrl)
  t_lme4 <- proc.time()[["elapsed"]] - t0
  check_lme4(name, f)
  t0 <- proc.time()[["elapsed"]]
  g <- glmmTMB(fo, data, family = fam, control = tctrl)
  t_tmb <- proc.time()[["elapsed"]] - t0
  check_tmb(name, g)

  fe_map <- list(fac = fac, data = data)
  fe <- fixef(f); se <- sqrt(diag(as.matrix(vcov(f))))
  fe_t <- fixef(g)$cond; se_t <- sqrt(diag(vcov(g)$cond))
  stopifnot(identical(names(fe), names(fe_t)))
  vc <- VarCorr(f); vc_t <- VarCorr(g)$cond
  stopifnot(setequal(names(vc), names(vc_t)))
  ll <- as.numeric(logLik(f)); ll_t <- as.numeric(logLik(g))
  sigma_l <- if (gaussian_ml) sigma(f) else NULL
  sigma_t <- if (gaussian_ml) sigma(g) else NULL

  # the same Laplace objective (TMB's) at glmmTMB's and at lme4's estimates
  ll_t_self <- tmb_loglik_at(g, fe_t, covs_of(vc_t), sigma_t)
  stopifnot(abs(ll_t_self - ll_t) < 1e-6)  # the parameter mapping reproduces glmmTMB's value
  ll_t_at_l <- tmb_loglik_at(g, fe, covs_of(vc)[names(vc_t)], sigma_l)

  cov_l <- covs_of(vc); cov_t <- covs_of(vc_t)[names(vc)]
  rel_var <- max(unlist(lapply(names(vc), function(k) {
    sc <- sqrt(outer(diag(cov_l[[k]]), diag(cov_l[[k]])))
    abs(cov_t[[k]] - cov_l[[k]]) / sc
  })))
  agreement <- list(
    max_fixed_effect_diff_in_se = sig(max(abs(fe_t - fe) / se)),
    max_std_error_rel_diff = sig(max(abs(se_t / se - 1))),
    max_covariance_rel_diff = sig(rel_var),
    loglik_diff = sig(ll_t - ll),
    tmb_max_abs_gradient = sig(max(abs(g$sdr$gradient.fixed))),
    loglik_tmb_at_lme4_estimates = sig(ll_t_at_l),
    loglik_tmb_at_lme4_estimates_diff = sig(ll_t_at_l - ll))
  if (gaussian_ml) agreement$residual_variance_rel_diff <- sig(sigma_t^2 / sigma_l^2 - 1)
  stopifnot(agreement$max_fixed_effect_diff_in_se < 0.01, rel_var < 0.005,
            abs(ll_t - ll) < 1e-4, abs(ll_t_at_l - ll) < 1e-4)

  ng <- ngrps(f)
  fl <- getME(f, "flist")
  for (k in names(fl)) stopifnot(ng[[k]] == nlevels(droplevels(fl[[k]])))
  names_dglmm <- map_names(names(fe), fac, data)
  rec <- list(
    data = data_file, n_obs = nrow(data),
    formula_lme4 = formula_lme4, formula_dglmm = formula_dglmm,
    family = family, link = link, trials = trials,
    method = if (gaussian_ml) "ml" else "laplace", n_agq = if (gaussian_ml) 0L else 1L,
    reference_engine = if (gaussian_ml) "lme4::lmer" else "lme4::glmer",
    fixed_effects = as.list(sig(fe)), std_errors = as.list(setNames(sig(se), names(fe))),
    fixed_effect_names_dglmm = as.list(names_dglmm),
    random_effects = re_blocks(vc, fe_map),
    n_groups = as.list(setNames(as.integer(ng), names(ng))),
    loglik = sig(ll), deviance = sig(-2 * ll), lme4_deviance = sig(deviance(f)),
    df = as.integer(attr(logLik(f), "df")))
  if (gaussian_ml) rec$residual_variance <- sig(sigma_l^2)
  tmb <- list(
    engine = "glmmTMB", fixed_effects = as.list(sig(fe_t)),
    std_errors = as.list(setNames(sig(se_t), names(fe_t))),
    random_effects = re_blocks(vc_t[names(vc)], fe_map), loglik = sig(ll_t))
  if (gaussian_ml) tmb$residual_variance <- sig(sigma_t^2)
  rec$glmmTMB <- tmb
  rec$agreement <- agreement
  rec$note <- note
  cases[[name]] <<- rec
  message(sprintf(paste("%-28s logLik lme4 %.6f glmmTMB %.6f (TMB at lme4 %.6f); max |dbeta|/se %.2e;",
                        "max cov rel %.2e; %.1f s / %.1f s"), name, ll, ll_t, ll_t_at_l,
                  agreement$max_fixed_effect_diff_in_se, rel_var, t_lme4, t_tmb))
}

# ---------------------------------------------------------------------------------------------
# data

# guImmun (mlmRev): immunisation of 2159 children of 1595 mothers in 161 Guatemalan communities
# (Rodriguez & Goldman).  immun as 0/1; the categorical covariates as strings.
data("guImmun", package = "mlmRev")
gu_cat <- c("kid2p", "mom25p", "ord", "ethn", "momEd", "husEd", "momWork", "rural")
guimmun <- data.frame(comm = as.integer(as.character(guImmun$comm)),
                      mom = as.integer(as.character(guImmun$mom)),
                      immun = as.integer(guImmun$immun == "Y"))
for (v in gu_cat) guimmun[[v]] <- as.character(guImmun[[v]])
guimmun$pcInd81 <- guImmun$pcInd81
gu <- write_and_read(guimmun, "guimmun.csv", gu_cat)
for (v in gu_cat) gu[[v]] <- sorted_factor(gu[[v]])
gu$comm <- factor(gu$comm); gu$mom <- factor(gu$mom)
fac_gu <- setNames(as.list(gu_cat), gu_cat)

# grouseticks (lme4): ticks on 403 red grouse chicks (INDEX) in 118 broods in 63 locations;
# sHEIGHT = scale(HEIGHT) (mean 0, sd 1) precomputed; YEAR an integer, categorical in the
# formulas (dglmm: C(YEAR)).  BROOD is nested in LOCATION in the data (checked below).
data("grouseticks", package = "lme4")
grouse <- data.frame(INDEX = as.integer(as.character(grouseticks$INDEX)),
                     BROOD = as.integer(as.character(grouseticks$BROOD)),
                     LOCATION = as.integer(as.character(grouseticks$LOCATION)),
                     YEAR = as.integer(as.character(grouseticks$YEAR)),
                     TICKS = as.integer(grouseticks$TICKS),
                     sHEIGHT = as.numeric(scale(grouseticks$HEIGHT)))
gt <- write_and_read(grouse, "grouseticks.csv", character())
for (v in c("INDEX", "BROOD", "LOCATION")) gt[[v]] <- factor(gt[[v]])
gt$YEAR <- sorted_factor(gt$YEAR)
fac_gt <- list(YEAR = "C(YEAR)")

# cbpp (lme4) with an observation-level factor obs = 1..56 (overdispersion)
data("cbpp", package = "lme4")
cbpp_obs <- data.frame(herd = as.integer(as.character(cbpp$herd)), obs = seq_len(nrow(cbpp)),
                       period = as.integer(as.character(cbpp$period)),
                       incidence = as.integer(cbpp$incidence), size = as.integer(cbpp$size))
cb <- write_and_read(cbpp_obs, "cbpp_obs.csv", character())
cb$herd <- factor(cb$herd); cb$obs <- factor(cb$obs); cb$period <- sorted_factor(cb$period)
fac_cb <- list(period = "C(period)")

# egsingle (mlmRev): maths scores of 1721 pupils (childid) in 60 schools, years 1-6 (year
# centred); black, hispanic, retained as 0/1 integers, female "Female"/"Male"
data("egsingle", package = "mlmRev")
eg_df <- data.frame(schoolid = as.integer(as.character(egsingle$schoolid)),
                    childid = as.integer(as.character(egsingle$childid)),
                    year = egsingle$year, math = egsingle$math,
                    female = as.character(egsingle$female),
                    black = as.integer(as.character(egsingle$black)),
                    hispanic = as.integer(as.character(egsingle$hispanic)),
                    retained = as.integer(as.character(egsingle$retained)))
eg <- write_and_read(eg_df, "egsingle.csv", "female")
eg$schoolid <- factor(eg$schoolid); eg$childid <- factor(eg$childid)
eg$female <- sorted_factor(eg$female)
fac_eg <- list(female = "female")

# nesting in the data (as lme4 sees it): every inner unit inside one outer unit
nested_in <- function(inner, outer) all(tapply(as.character(outer), as.character(inner),
                                               function(v) length(unique(v))) == 1)
stopifnot(nested_in(gu$mom, gu$comm), nested_in(gt$BROOD, gt$LOCATION),
          nested_in(gt$INDEX, gt$BROOD), nested_in(cb$obs, cb$herd),
          nested_in(eg$childid, eg$schoolid))

# ---------------------------------------------------------------------------------------------
# models

gu_rhs <- "kid2p + mom25p + ord + ethn + momEd + husEd + momWork + rural + pcInd81"

# 1. three-level logistic (children in mothers in communities), Rodriguez-Goldman model
fit_case("guimmun_logit_laplace",
         sprintf("immun ~ %s + (1 | comm/mom)", gu_rhs),
         sprintf("immun ~ %s + (1 | comm/mom)", gu_rhs),
         gu, "guimmun.csv", "binomial", "logit", fac = fac_gu)

# 1b. the same with a correlated random slope of kid2p at community level; the mother level
#     written as an explicit interaction (lme4 names it "comm:mom")
fit_case("guimmun_logit_slope_laplace",
         sprintf("immun ~ %s + (1 + kid2p | comm) + (1 | comm:mom)", gu_rhs),
         sprintf("immun ~ %s + (1 + kid2p | comm) + (1 | comm:mom)", gu_rhs),
         gu, "guimmun.csv", "binomial", "logit", fac = fac_gu)

# 2. three-level Poisson (chicks in broods in locations; chick level = residual)
fit_case("grouseticks_poisson_laplace",
         "TICKS ~ YEAR + sHEIGHT + (1 | LOCATION/BROOD)",
         "TICKS ~ C(YEAR) + sHEIGHT + (1 | LOCATION/BROOD)",
         gt, "grouseticks.csv", "poisson", "log", fac = fac_gt)

# 2b. four levels: an observation-level random effect (INDEX) in broods in locations, nested in
#     the data without "/"
fit_case("grouseticks_poisson_obs_laplace",
         "TICKS ~ YEAR + sHEIGHT + (1 | LOCATION) + (1 | BROOD) + (1 | INDEX)",
         "TICKS ~ C(YEAR) + sHEIGHT + (1 | LOCATION) + (1 | BROOD) + (1 | INDEX)",
         gt, "grouseticks.csv", "poisson", "log", fac = fac_gt)

# 3. binomial with an observation-level random effect
fit_case("cbpp_obs_binomial_laplace",
         "cbind(incidence, size - incidence) ~ period + (1 | herd) + (1 | obs)",
         "incidence ~ C(period) + (1 | herd) + (1 | obs)",
         cb, "cbpp_obs.csv", "binomial", "logit", fac = fac_cb, trials = "size")

# 4. three-level Gaussian with a correlated random slope at the child level (ML, not REML)
fit_case("egsingle_gaussian_slope_ml",
         "math ~ year + female + black + hispanic + retained + (year | childid) + (1 | schoolid)",
         "math ~ year + female + black + hispanic + retained + (1 + year | childid) + (1 | schoolid)",
         eg, "egsingle.csv", "gaussian", "identity", fac = fac_eg)

# ---------------------------------------------------------------------------------------------
# write

versions <- list(R = R.version.string, lme4 = as.character(packageVersion("lme4")),
                 glmmTMB = as.character(packageVersion("glmmTMB")),
                 TMB = as.character(packageVersion("TMB")),
                 mlmRev = as.character(packageVersion("mlmRev")),
                 Matrix = as.character(packageVersion("Matrix")))
out <- list(
  `_about` = paste("Nested-model reference fits (issue 10), written by",
                   "benchmarks/r/nested_reference.R; see tests/data/NESTED_REFERENCE.md.",
                   "Reference = lme4 (glmer Laplace / lmer ML); glmmTMB fit and agreement beside it."),
  `_versions` = versions,
  cases = cases)
path <- file.path(out_dir, "nested_reference_fits.json")
writeLines(toJSON(out, auto_unbox = TRUE, pretty = TRUE, digits = NA, null = "null"), path)
message(sprintf("\n%d cases written to %s", length(cases), path))
print(versions)
