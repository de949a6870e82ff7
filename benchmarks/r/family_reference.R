# Reference fits from R (glmmTMB, ordinal::clmm; lme4::glmer.nb for comparison) for dglmm's
# NEW FAMILIES: nbinom2, nbinom1, gamma, beta, ordinal (cumulative link).
#
# Run from the repository root:
#
#     Rscript benchmarks/r/family_reference.R
#
# It writes exactly these files (and nothing else):
#
#   tests/data/families/{salamanders,owls,sleepstudy,cbpp_prop,wine,soup}.csv   the data
#   tests/data/families/family_reference_fits.json                             the fits
#
# Requirements (Debian): r-base-core r-cran-lme4 r-cran-glmmtmb r-cran-jsonlite r-cran-ordinal.
# R is only used to make references: dglmm itself never depends on it.
#
# All fits are made on the data read back from the CSV just written.  The script stops (writes
# no JSON) if a fit fails to converge, has a non-positive-definite Hessian or a zero variance,
# if a family-parameter mapping does not reproduce glmmTMB's own joint log-density by hand
# (dnbinom / dgamma / dbeta at b = 0), or if clmm's log-likelihood does not match a direct
# per-group numerical integration (nAGQ = 10) / a hand-made Laplace approximation (nAGQ = 1).
#
# `loglik` is the full log-likelihood with all constants (log y!, log Gamma terms).
# Categorical levels are put in the order dglmm uses (sorted by code point), so the
# coefficient names map one to one (`fixed_effect_names_dglmm`).

suppressPackageStartupMessages({
  library(lme4)
  library(glmmTMB)
  library(jsonlite)
  library(ordinal)
})

stopifnot(file.exists("tests/data/reference_fits.json"))  # run from the repository root
out_dir <- "tests/data/families"
dir.create(out_dir, showWarnings = FALSE)
SIG <- 10  # significant digits stored

# ---------------------------------------------------------------------------------------------
# helpers (as in nested_reference.R)

sorted_factor <- function(x) {
  # dglmm's default level order: numbers numerically, strings by code point
  if (is.numeric(x)) return(factor(x, levels = sort(unique(x))))
  x <- as.character(x)
  lev <- unique(x)
  lev <- lev[order(sapply(lev, function(s) paste(sprintf("%06d", utf8ToInt(s)), collapse = "")))]
  factor(x, levels = lev)
}

sig <- function(x) signif(x, SIG)

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

re_blocks <- function(vc, fac, data) {
  res <- list()
  for (g in names(vc)) {
    m <- vc[[g]]
    cov <- unname(matrix(as.numeric(m), nrow(m)))
    sd <- sqrt(diag(cov))
    corr <- cov / outer(sd, sd)
    terms <- rownames(m)
    res[[g]] <- list(terms = I(terms), terms_dglmm = I(unname(map_names(terms, fac, data))),
                     sd = I(sig(sd)), corr = sig(corr), covariance = sig(cov),
                     variance = I(sig(diag(cov))))
  }
  res
}

covs_of <- function(vc) lapply(vc, function(m) unname(matrix(as.numeric(m), nrow(m))))

# glmmTMB: nlminb's rel.tol 1e-11 / 1e-12 ends in "singular convergence (7)" on most of these
# models at the same optimum (same logLik to 1e-10); 1e-10 gives "relative convergence (4)".
# Convergence is additionally checked by a Newton step (see check_tmb).
tctrl <- glmmTMBControl(optCtrl = list(iter.max = 1e4, eval.max = 1e4, rel.tol = 1e-10,
                                       x.tol = 0))

# one Newton step from glmmTMB's optimum on TMB's Laplace objective, in SE units
newton_step_in_se <- function(g) {
  par <- g$fit$par
  gr <- as.numeric(g$obj$gr(par))
  H <- optimHess(par, g$obj$fn, g$obj$gr)
  step <- solve(H, gr)
  max(abs(step) / sqrt(diag(solve(H))))
}

check_tmb <- function(name, g) {
  bad <- character()
  if (g$fit$convergence != 0) bad <- c(bad, paste("convergence code", g$fit$convergence,
                                                  g$fit$message))
  if (!isTRUE(g$sdr$pdHess)) bad <- c(bad, "Hessian not positive definite")
  vc <- VarCorr(g)$cond
  for (k in names(vc)) if (any(diag(vc[[k]]) < 1e-8)) bad <- c(bad, "singular (zero variance)")
  step <- newton_step_in_se(g)
  if (step > 1e-3) bad <- c(bad, sprintf("Newton step %.2e SE from the optimum", step))
  if (length(bad)) stop(sprintf("%s (glmmTMB): %s", name, paste(bad, collapse = "; ")))
  step
}

# glmmTMB's outer parameter vector at given beta, covariances (scalar or 2 x 2 blocks, named
# as glmmTMB names the terms) and dispersion parameter betad (glmmTMB 1.1.5: theta = log sd,
# then rho / sqrt(1 - rho^2) for a 2 x 2 block)
tmb_par <- function(g, beta, covs, betad) {
  par <- g$fit$par
  par[names(par) == "beta"] <- beta
  theta <- numeric()
  for (k in names(VarCorr(g)$cond)) {
    S <- covs[[k]]
    sd <- sqrt(diag(S))
    if (length(sd) == 1) theta <- c(theta, log(sd))
    else if (length(sd) == 2) {
      rho <- S[1, 2] / (sd[1] * sd[2])
      theta <- c(theta, log(sd), rho / sqrt(1 - rho^2))
    } else stop("only 1 x 1 and 2 x 2 blocks handled")
  }
  stopifnot(sum(names(par) == "theta") == length(theta), sum(names(par) == "betad") == 1)
  par[names(par) == "theta"] <- theta
  par[names(par) == "betad"] <- betad
  par
}

# family-parameter mappings of glmmTMB 1.1.5 (its dispersion parameter betad; sigma(fit)):
#   nbinom2  betad = log k,     sigma = k               Var = mu + mu^2 / k
#   nbinom1  betad = log phi,   sigma = phi             Var = mu (1 + phi)  (NB, size mu / phi)
#   Gamma    betad = log shape, sigma = 1 / sqrt(shape) (the CV)    Var = mu^2 / shape
#   beta     betad = log phi,   sigma = phi             Beta(mu phi, (1 - mu) phi),
#                                                       Var = mu (1 - mu) / (1 + phi)
# natural parameter from betad, its derivative d/d betad (for the delta-method SE), sigma(fit)
# from betad, and the log-density of y at mean mu written with R's own density functions
FAMILIES <- list(
  nbinom2 = list(tmb = nbinom2(), param = "size", from = function(d) exp(d),
                 deriv = function(d) exp(d), sigma = function(d) exp(d),
                 mean = exp, logdens = function(y, mu, k) dnbinom(y, size = k, mu = mu, log = TRUE),
                 variance = function(mu, k) mu + mu^2 / k),
  nbinom1 = list(tmb = nbinom1(), param = "phi", from = function(d) exp(d),
                 deriv = function(d) exp(d), sigma = function(d) exp(d),
                 mean = exp,
                 logdens = function(y, mu, phi) dnbinom(y, size = mu / phi, mu = mu, log = TRUE),
                 variance = function(mu, phi) mu * (1 + phi)),
  gamma = list(tmb = Gamma(link = "log"), param = "shape", from = function(d) exp(d),
               deriv = function(d) exp(d), sigma = function(d) exp(-d / 2),
               mean = exp,
               logdens = function(y, mu, a) dgamma(y, shape = a, scale = mu / a, log = TRUE),
               variance = function(mu, a) mu^2 / a),
  beta = list(tmb = beta_family(link = "logit"), param = "precision",
              from = function(d) exp(d), deriv = function(d) exp(d), sigma = function(d) exp(d),
              mean = plogis,
              logdens = function(y, mu, phi) dbeta(y, mu * phi, (1 - mu) * phi, log = TRUE),
              variance = function(mu, phi) mu * (1 - mu) / (1 + phi)))

# glmmTMB's joint log-density (TMB's env$f: data | b plus b's normal density) at its estimates
# with every random effect set to 0, against the same computed by hand from the mapping
mapping_check <- function(g, fam, data, yname, offset) {
  x <- g$obj$env$last.par.best
  rnd <- g$obj$env$random
  x[-rnd] <- g$fit$par
  x[rnd] <- 0
  tmb <- -as.numeric(g$obj$env$f(x, order = 0))
  eta <- as.numeric(getME(g, "X") %*% fixef(g)$cond)
  if (!is.null(offset)) eta <- eta + data[[offset]]
  p <- fam$from(g$fit$par[["betad"]])
  hand <- sum(fam$logdens(data[[yname]], fam$mean(eta), p))
  covs <- covs_of(VarCorr(g)$cond)
  for (k in names(covs)) {
    S <- covs[[k]]
    n_lev <- nrow(ranef(g)$cond[[k]])
    hand <- hand + n_lev * (-nrow(S) / 2 * log(2 * pi) - 0.5 * as.numeric(determinant(S)$modulus))
  }
  hand - tmb
}

cases <- list()

tmb_case <- function(name, formula_r, formula_dglmm, data, data_file, family, fac,
                     offset = NULL, note = NULL) {
  fam <- FAMILIES[[family]]
  t0 <- proc.time()[["elapsed"]]
  g <- glmmTMB(as.formula(formula_r), data, family = fam$tmb, control = tctrl)
  elapsed <- proc.time()[["elapsed"]] - t0
  step <- check_tmb(name, g)
  betad <- g$fit$par[["betad"]]
  p <- fam$from(betad)
  stopifnot(abs(sigma(g) / fam$sigma(betad) - 1) < 1e-12)  # sigma(fit) as documented above
  se_betad <- sqrt(g$sdr$cov.fixed["betad", "betad"])
  p_se <- abs(fam$deriv(betad)) * se_betad
  map_diff <- mapping_check(g, fam, data, all.vars(as.formula(formula_r))[1], offset)
  stopifnot(abs(map_diff) < 1e-7)
  # the variance function: glmmTMB's own family$variance (where it has one) against the mapping
  mu_chk <- fitted(g)[1:5]
  var_own <- tryCatch(g$modelInfo$family$variance(mu_chk, sigma(g)), error = function(e) NULL)
  if (!is.null(var_own)) stopifnot(max(abs(var_own / fam$variance(mu_chk, p) - 1)) < 1e-12)
  message(sprintf("  %s: glmmTMB's family$variance(mu, sigma) %s", name,
                  if (is.null(var_own)) "not available" else "matches the mapping"))
  fe <- fixef(g)$cond
  se <- sqrt(diag(vcov(g)$cond))
  vc <- VarCorr(g)$cond
  ll <- as.numeric(logLik(g))
  rec <- list(
    data = data_file, n_obs = nrow(data), formula_r = formula_r, formula_dglmm = formula_dglmm,
    family = family, link = g$modelInfo$family$link, trials = NULL, offset = offset,
    method = "laplace", n_agq = 1L, reference_engine = "glmmTMB",
    fixed_effects = as.list(sig(fe)), std_errors = as.list(setNames(sig(se), names(fe))),
    fixed_effect_names_dglmm = as.list(map_names(names(fe), fac, data)),
    random_effects = re_blocks(vc, fac, data),
    n_groups = as.list(sapply(ranef(g)$cond, nrow)),
    family_parameters = setNames(list(sig(p)), fam$param),
    family_parameter_std_errors = setNames(list(sig(p_se)), fam$param),
    glmmTMB_sigma = sig(sigma(g)), glmmTMB_log_sigma_std_error = sig(se_betad),
    loglik = sig(ll), deviance = sig(-2 * ll), df = as.integer(attr(logLik(g), "df")),
    checks = list(convergence = g$fit$message, newton_step_in_se = sig(step),
                  max_abs_gradient = sig(max(abs(g$sdr$gradient.fixed))),
                  mapping_logdens_at_b0_hand_minus_tmb = sig(map_diff),
                  glmmTMB_variance_function_matches = !is.null(var_own)),
    note = note)
  cases[[name]] <<- rec
  message(sprintf("%-30s logLik %.6f  %s %.6g (SE %.3g)  Newton step %.1e SE, map diff %.1e, %.1f s",
                  name, ll, fam$param, p, p_se, step, map_diff, elapsed))
  invisible(g)
}

# ---------------------------------------------------------------------------------------------
# data

# Salamanders (glmmTMB): counts of salamanders at 23 sites, 7 species / life stages
data("Salamanders", package = "glmmTMB")
sal_df <- data.frame(site = as.character(Salamanders$site),
                     mined = as.character(Salamanders$mined),
                     spp = as.character(Salamanders$spp), count = as.integer(Salamanders$count))
sal <- write_and_read(sal_df, "salamanders.csv", c("site", "mined", "spp"))
sal$site <- factor(sal$site); sal$mined <- sorted_factor(sal$mined)
sal$spp <- sorted_factor(sal$spp)
fac_sal <- list(mined = "mined", spp = "spp")

# Owls (glmmTMB): sibling negotiation of 599 broods visits in 27 nests; the offset
# log(BroodSize) precomputed as log_brood
data("Owls", package = "glmmTMB")
owl_df <- data.frame(Nest = as.character(Owls$Nest),
                     FoodTreatment = as.character(Owls$FoodTreatment),
                     SexParent = as.character(Owls$SexParent),
                     SiblingNegotiation = as.integer(Owls$SiblingNegotiation),
                     BroodSize = as.integer(Owls$BroodSize), log_brood = log(Owls$BroodSize))
owl <- write_and_read(owl_df, "owls.csv", c("Nest", "FoodTreatment", "SexParent"))
owl$Nest <- factor(owl$Nest)
owl$FoodTreatment <- sorted_factor(owl$FoodTreatment)
owl$SexParent <- sorted_factor(owl$SexParent)
fac_owl <- list(FoodTreatment = "FoodTreatment", SexParent = "SexParent")

# sleepstudy (lme4): reaction times of 18 subjects over 10 days
data("sleepstudy", package = "lme4")
slp_df <- data.frame(Reaction = sleepstudy$Reaction, Days = as.integer(sleepstudy$Days),
                     Subject = as.integer(as.character(sleepstudy$Subject)))
slp <- write_and_read(slp_df, "sleepstudy.csv", character())
slp$Subject <- factor(slp$Subject)

# cbpp (lme4) as a proportion in (0, 1): prop = (incidence + 0.5) / (size + 1)
data("cbpp", package = "lme4")
cbp_df <- data.frame(herd = as.integer(as.character(cbpp$herd)),
                     period = as.integer(as.character(cbpp$period)),
                     incidence = as.integer(cbpp$incidence), size = as.integer(cbpp$size))
cbp_df$prop <- (cbp_df$incidence + 0.5) / (cbp_df$size + 1)
cbp <- write_and_read(cbp_df, "cbpp_prop.csv", character())
stopifnot(all(cbp$prop > 0 & cbp$prop < 1))
cbp$herd <- factor(cbp$herd); cbp$period <- sorted_factor(cbp$period)
fac_cbp <- list(period = "C(period)")

# wine (ordinal): bitterness ratings 1..5 of 9 judges; soup: sureness ratings 1..6 of 185
# respondents.  The responses as integers (their ordered levels are 1..K).
data("wine", package = "ordinal"); data("soup", package = "ordinal")
stopifnot(identical(levels(wine$rating), as.character(1:5)),
          identical(levels(soup$SURENESS), as.character(1:6)))
wine_df <- data.frame(rating = as.integer(as.character(wine$rating)),
                      temp = as.character(wine$temp), contact = as.character(wine$contact),
                      judge = as.integer(as.character(wine$judge)))
wn <- write_and_read(wine_df, "wine.csv", c("temp", "contact"))
wn$rating <- factor(wn$rating, levels = 1:5, ordered = TRUE)
wn$temp <- sorted_factor(wn$temp); wn$contact <- sorted_factor(wn$contact)
wn$judge <- factor(wn$judge)
fac_wn <- list(temp = "temp", contact = "contact")
soup_df <- data.frame(SURENESS = as.integer(as.character(soup$SURENESS)),
                      PROD = as.character(soup$PROD),
                      RESP = as.integer(as.character(soup$RESP)))
sp <- write_and_read(soup_df, "soup.csv", "PROD")
sp$SURENESS <- factor(sp$SURENESS, levels = 1:6, ordered = TRUE)
sp$PROD <- sorted_factor(sp$PROD); sp$RESP <- factor(sp$RESP)
fac_sp <- list(PROD = "PROD")

# ---------------------------------------------------------------------------------------------
# glmmTMB models (Laplace)

g_nb2 <- tmb_case("salamanders_nbinom2_laplace", "count ~ mined + spp + (1 | site)",
                  "count ~ mined + spp + (1 | site)", sal, "salamanders.csv", "nbinom2", fac_sal)

# glmer.nb for comparison only: lme4's negative.binomial(theta) with the log link is not
# canonical, so glmer's nAGQ = 1 uses the expected (Fisher) information in the Laplace
# determinant, and glmer.nb alternates between glmer fits at fixed theta and a 1-d theta
# optimisation.  Its logLik is therefore not glmmTMB's plain Laplace value; the reference is
# glmmTMB's fit.  TMB's Laplace at glmer.nb's estimates shows how much is approximation.
nb <- glmer.nb(count ~ mined + spp + (1 | site), sal,
               control = glmerControl(optimizer = "bobyqa", tolPwrss = 1e-12,
                                      optCtrl = list(rhoend = 1e-9, maxfun = 1e5)))
stopifnot(length(nb@optinfo$conv$lme4$messages) == 0, !isSingular(nb, tol = 1e-5))
theta_nb <- getME(nb, "glmer.nb.theta")
ll_nb <- as.numeric(logLik(nb))
ll_tmb_at_nb <- -as.numeric(g_nb2$obj$fn(tmb_par(g_nb2, fixef(nb), covs_of(VarCorr(nb)),
                                                  log(theta_nb))))
stopifnot(identical(names(fixef(nb)), names(fixef(g_nb2)$cond)))
cases$salamanders_nbinom2_laplace$glmer_nb <- list(
  engine = "lme4::glmer.nb (comparison only, not the reference)",
  fixed_effects = as.list(sig(fixef(nb))),
  std_errors = as.list(setNames(sig(sqrt(diag(as.matrix(vcov(nb))))), names(fixef(nb)))),
  random_effects = re_blocks(VarCorr(nb), fac_sal, sal),
  family_parameters = list(size = sig(theta_nb)), loglik = sig(ll_nb),
  loglik_tmb_laplace_at_glmer_nb_estimates = sig(ll_tmb_at_nb),
  max_fixed_effect_diff_in_se = sig(max(abs(fixef(nb) - fixef(g_nb2)$cond) /
                                          sqrt(diag(vcov(g_nb2)$cond)))))
message(sprintf("  glmer.nb: theta %.6f logLik %.6f; TMB Laplace at its estimates %.6f",
                theta_nb, ll_nb, ll_tmb_at_nb))

tmb_case("owls_nbinom1_offset_laplace",
         "SiblingNegotiation ~ FoodTreatment * SexParent + offset(log_brood) + (1 | Nest)",
         "SiblingNegotiation ~ FoodTreatment * SexParent + (1 | Nest)",
         owl, "owls.csv", "nbinom1", fac_owl, offset = "log_brood",
         note = "offset log_brood = log(BroodSize), passed to dglmm as offset='log_brood'")

tmb_case("salamanders_nbinom1_laplace", "count ~ mined + spp + (1 | site)",
         "count ~ mined + spp + (1 | site)", sal, "salamanders.csv", "nbinom1", fac_sal)

tmb_case("sleepstudy_gamma_log_slope_laplace", "Reaction ~ Days + (Days | Subject)",
         "Reaction ~ Days + (1 + Days | Subject)", slp, "sleepstudy.csv", "gamma", list())

tmb_case("cbpp_beta_logit_laplace", "prop ~ period + (1 | herd)",
         "prop ~ C(period) + (1 | herd)", cbp, "cbpp_prop.csv", "beta", fac_cbp,
         note = "prop = (incidence + 0.5) / (size + 1), precomputed in the CSV")

# ---------------------------------------------------------------------------------------------
# ordinal::clmm (cumulative link, P(Y <= k) = F(alpha_k - eta), eta = x'beta + b, no intercept)

cdf_of <- function(link) switch(link, logit = plogis, probit = pnorm)

# per group, the log of the integrand (log p(y | b) + log N(b; 0, s^2)) as a function of b
# at parameters par = c(alpha, beta, log sd) (clmm's order)
group_logf <- function(par, data, yname, xform, gname, link) {
  X <- model.matrix(as.formula(xform), data)[, -1, drop = FALSE]
  n_a <- nlevels(data[[yname]]) - 1
  eta <- as.numeric(X %*% par[n_a + seq_len(ncol(X))])
  a <- c(-Inf, par[seq_len(n_a)], Inf)
  k <- as.integer(data[[yname]])
  s <- exp(par[[length(par)]])
  F <- cdf_of(link)
  lapply(split(seq_len(nrow(data)), data[[gname]]), function(idx) {
    function(b) vapply(b, function(bb) {
      u <- a[k[idx] + 1] - eta[idx] - bb
      l <- a[k[idx]] - eta[idx] - bb
      # F(u) - F(l), as F(-l) - F(-u) above 0 (no cancellation; F symmetric)
      sum(log(ifelse(l > 0, F(-l) - F(-u), F(u) - F(l)))) +
        dnorm(bb, 0, s, log = TRUE)
    }, 0)
  })
}

# marginal logLik at the fit's estimates: direct numerical integration per group, and a
# hand-made Laplace approximation (mode by optimize, curvature by central differences)
integrate_groups <- function(logfs) {
  sum(vapply(logfs, function(lf) {
    m <- optimize(lf, c(-15, 15), maximum = TRUE, tol = 1e-12)
    lmax <- m$objective
    r <- integrate(function(b) exp(lf(b) - lmax), -Inf, Inf, rel.tol = 1e-12,
                   subdivisions = 1000L)
    lmax + log(r$value)
  }, 0))
}
laplace_groups <- function(logfs) {
  sum(vapply(logfs, function(lf) {
    m <- optimize(lf, c(-15, 15), maximum = TRUE, tol = 1e-12)
    b <- m$maximum; d <- 1e-3
    h2 <- (lf(b + d) - 2 * lf(b) + lf(b - d)) / d^2
    m$objective + 0.5 * log(2 * pi) - 0.5 * log(-h2)
  }, 0))
}

clmm_case <- function(name, yname, xform, gname, data, data_file, fac, link, nagq) {
  fo <- as.formula(sprintf("%s %s + (1 | %s)", yname, xform, gname))
  t0 <- proc.time()[["elapsed"]]
  # ucminf: clmm's default nlminb stops at max |gradient| 8e-3 on soup (ucminf: 1e-5)
  o <- withCallingHandlers(clmm(fo, data = data, link = link, nAGQ = nagq,
                                control = clmm.control(method = "ucminf")),
                           warning = function(w) stop(sprintf("%s: %s", name, conditionMessage(w))))
  elapsed <- proc.time()[["elapsed"]] - t0
  maxgrad <- max(abs(o$gradient))
  ev <- eigen(o$Hessian, symmetric = TRUE, only.values = TRUE)$values
  # ucminf's codes 1 (small gradient) and 2 (small step) are convergence
  if (!(o$optRes$convergence %in% c(1, 2)) || maxgrad > 1e-3 || min(ev) <= 0 || o$ST[[1]] < 1e-4)
    stop(sprintf("%s (clmm): convergence %s, max gradient %.2e, min Hessian eigenvalue %.2e",
                 name, o$optRes$convergence, maxgrad, min(ev)))
  V <- vcov(o)
  se <- sqrt(diag(V))
  par <- c(o$alpha, o$beta, log(as.numeric(o$ST[[1]])))
  stopifnot(identical(rownames(V), c(names(o$alpha), names(o$beta), "ST1")),
            identical(colnames(model.matrix(as.formula(xform), data))[-1], names(o$beta)))
  logfs <- group_logf(par, data, yname, xform, gname, link)
  ll <- as.numeric(logLik(o))
  ll_int <- integrate_groups(logfs)
  ll_lap <- laplace_groups(logfs)
  # clmm's nAGQ = 1 value is not exactly the Laplace approximation (see FAMILY_REFERENCE.md):
  # allow 1e-5 there, 1e-6 against the integral for nAGQ = 10
  ref_diff <- if (nagq == 1) ll - ll_lap else ll - ll_int
  if (abs(ref_diff) > if (nagq == 1) 1e-5 else 1e-6)
    stop(sprintf("%s: clmm logLik %.10f, integrate %.10f, hand Laplace %.10f", name, ll,
                 ll_int, ll_lap))
  exact <- NULL
  if (nagq == 1) {
    # the maximum of the exact Laplace approximation, from clmm's estimates
    # (warnings: log of a negative curvature in far line-search points; optim backs off)
    nll <- function(p) suppressWarnings(-laplace_groups(group_logf(p, data, yname, xform,
                                                                    gname, link)))
    opt <- optim(par, nll, method = "BFGS", control = list(reltol = 1e-15, maxit = 1000))
    stopifnot(opt$convergence == 0)
    se_all <- c(se[names(o$alpha)], se[names(o$beta)], se[["ST1"]])
    exact <- list(loglik = sig(-opt$value),
                  estimates = as.list(setNames(sig(opt$par), c(names(par)[-length(par)], "log_sd"))),
                  max_estimate_diff_from_clmm_in_se = sig(max(abs(opt$par - par) / se_all)),
                  loglik_minus_clmm_loglik = sig(-opt$value - ll))
  }
  alpha <- o$alpha
  thr <- lapply(names(alpha), function(t) list(term = t, estimate = sig(alpha[[t]]),
                                             std_error = sig(se[[t]])))
  beta <- o$beta
  sd <- as.numeric(o$ST[[1]])
  se_log_sd <- se[["ST1"]]
  vc <- VarCorr(o)
  y_levels <- as.integer(levels(data[[yname]]))
  rec <- list(
    data = data_file, n_obs = nrow(data),
    formula_r = sprintf("%s %s + (1 | %s)", yname, xform, gname),
    formula_dglmm = sprintf("%s %s + (1 | %s)", yname, xform, gname),
    family = "ordinal", link = link, trials = NULL, offset = NULL,
    method = if (nagq == 1) "laplace" else "agq", n_agq = as.integer(nagq),
    reference_engine = "ordinal::clmm", response_levels = I(y_levels),
    thresholds = thr,
    fixed_effects = as.list(sig(beta)),
    std_errors = as.list(setNames(sig(se[names(beta)]), names(beta))),
    fixed_effect_names_dglmm = as.list(map_names(names(beta), fac, data)),
    random_effects = re_blocks(vc, fac, data),
    random_effect_std_errors = setNames(list(list(sd = sig(sd * se_log_sd),
                                                  variance = sig(2 * sd^2 * se_log_sd),
                                                  log_sd = sig(se_log_sd))), gname),
    n_groups = setNames(list(nlevels(data[[gname]])), gname),
    family_parameters = setNames(list(), character()),
    loglik = sig(ll), deviance = sig(-2 * ll), df = as.integer(attr(logLik(o), "df")),
    checks = list(clmm_convergence = o$optRes$message, clmm_optimizer = "ucminf", max_abs_gradient = sig(maxgrad),
                  loglik_integrate = sig(ll_int), loglik_hand_laplace = sig(ll_lap),
                  loglik_minus_integrate = sig(ll - ll_int),
                  loglik_minus_hand_laplace = sig(ll - ll_lap)),
    exact_laplace_optimum = exact)
  cases[[name]] <<- rec
  message(sprintf("%-30s logLik %.8f; - integrate %.2e; - hand Laplace %.2e; %.1f s",
                  name, ll, ll - ll_int, ll - ll_lap, elapsed))
}

for (lk in c("logit", "probit")) for (q in c(1, 10)) {
  clmm_case(sprintf("wine_ordinal_%s_%s", lk, if (q == 1) "laplace" else "agq10"),
            "rating", "~ temp + contact", "judge", wn, "wine.csv", fac_wn, lk, q)
}
clmm_case("soup_ordinal_logit_agq10", "SURENESS", "~ PROD", "RESP", sp, "soup.csv", fac_sp,
          "logit", 10)

# ---------------------------------------------------------------------------------------------
# write

versions <- list(R = R.version.string, glmmTMB = as.character(packageVersion("glmmTMB")),
                 TMB = as.character(packageVersion("TMB")),
                 lme4 = as.character(packageVersion("lme4")),
                 ordinal = as.character(packageVersion("ordinal")),
                 Matrix = as.character(packageVersion("Matrix")))
out <- list(
  `_about` = paste("New-family reference fits (nbinom2, nbinom1, gamma, beta, ordinal), written",
                   "by benchmarks/r/family_reference.R; see tests/data/FAMILY_REFERENCE.md.",
                   "Reference = glmmTMB Laplace; ordinal::clmm (Laplace / adaptive GH)."),
  `_versions` = versions,
  cases = cases)
path <- file.path(out_dir, "family_reference_fits.json")
writeLines(toJSON(out, auto_unbox = TRUE, pretty = TRUE, digits = NA, null = "null"), path)
message(sprintf("\n%d cases written to %s", length(cases), path))
print(versions)
