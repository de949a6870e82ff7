# Reference fits from R (lme4 / glmmTMB) for dglmm's golden tests.
#
# Run from the repository root:
#
#     Rscript benchmarks/r/make_references.R
#
# It writes exactly these files (and nothing else):
#
#   tests/data/extra_reference_fits.json   extra reference cases (same layout as reference_fits.json
#                                           plus data / formula / family metadata)
#   tests/data/shared_cases.json           dglmm formulas etc. for the cases in reference_fits.json
#   tests/data/EXTRA_REFERENCE.md          index of the extra cases
#   tests/data/{verbagg,contraception,owls,epil2,grouseticks,dyestuff,cake}.csv
#
# It reads (never writes) the shared data sets tests/data/{cbpp,sleepstudy,salamanders}.csv.
#
# Requirements (Debian): r-base-core r-cran-lme4 r-cran-glmmtmb r-cran-jsonlite r-cran-mlmrev.
# R is only used to make references: dglmm itself never depends on it.
#
# Conventions
#   * `loglik` is always the FULL log-likelihood including all constants (log binomial
#     coefficients, log y!).  glmer's Laplace logLik() and glmmTMB's logLik() include them;
#     glmer's logLik() for nAGQ > 1 does not, so for the `agq` cases the marginal
#     log-likelihood is integrated numerically (R's integrate, rel.tol 1e-10) per group at
#     lme4's estimates.
#   * Categorical levels in R are put in the order dglmm uses (sorted: strings by code point,
#     numbers numerically) unless the dglmm formula gives C(x, levels=[...]).
#   * Fits that do not converge or are singular are NOT written; they are listed on stdout.

suppressPackageStartupMessages({
  library(lme4)
  library(glmmTMB)
  library(jsonlite)
})

stopifnot(file.exists("tests/data/reference_fits.json"))
out_dir <- "tests/data"
SIG <- 10  # significant digits stored

cases <- list()
problems <- character()

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

write_csv <- function(df, name) {
  path <- file.path(out_dir, name)
  write.csv(df, path, row.names = FALSE)
  sz <- file.size(path)
  stopifnot(sz < 1e6)
  message(sprintf("wrote %s (%d rows, %d bytes)", path, nrow(df), sz))
}

# R coefficient name -> formulaic column name.
# `fac` is a named list: variable -> list(expr = how the formula writes it, levels = levels)
map_names <- function(rnames, fac) {
  map_one <- function(part) {
    if (part == "(Intercept)") return("Intercept")
    for (v in names(fac)) {
      if (startsWith(part, v)) {
        rest <- substring(part, nchar(v) + 1)
        if (rest %in% fac[[v]]$levels) return(sprintf("%s[T.%s]", fac[[v]]$expr, rest))
      }
    }
    part
  }
  out <- vapply(rnames, function(nm) {
    paste(vapply(strsplit(nm, ":", fixed = TRUE)[[1]], map_one, ""), collapse = ":")
  }, "")
  as.list(setNames(out, rnames))
}

sig <- function(x) signif(x, SIG)

cov_blocks_lme4 <- function(fit) {
  vc <- VarCorr(fit)
  fl <- names(getME(fit, "flist"))
  base <- vapply(names(vc), function(nm) {
    b <- sub("\\.[0-9]+$", "", nm)
    if (!(nm %in% fl) && b %in% fl) b else nm
  }, "")
  res <- list()
  for (g in unique(base)) {
    mats <- vc[base == g]
    nms <- unlist(lapply(mats, function(m) rownames(m)))
    M <- as.matrix(Matrix::bdiag(lapply(mats, function(m) unclass(m)[, , drop = FALSE])))
    attr(M, "stddev") <- NULL
    attr(M, "correlation") <- NULL
    res[[g]] <- list(names = nms, matrix = sig(unname(M)))
  }
  res
}

cov_blocks_tmb <- function(fit) {
  vc <- VarCorr(fit)$cond
  res <- list()
  for (g in names(vc)) {
    m <- vc[[g]]
    res[[g]] <- list(names = rownames(m), matrix = sig(unname(matrix(m, nrow(m)))))
  }
  res
}

# exact marginal log-likelihood of a glmer fit with one scalar random effect (1 | g),
# integrated per group at the fitted estimates
# (laplace = TRUE: the Laplace approximation with the observed curvature instead, for checks)
exact_loglik_scalar <- function(fit, laplace = FALSE) {
  fam <- family(fit)
  stopifnot(length(getME(fit, "flist")) == 1, ncol(getME(fit, "Z")) == nlevels(getME(fit, "flist")[[1]]))
  X <- getME(fit, "X")
  eta0 <- drop(X %*% fixef(fit)) + fit@resp$offset
  g <- getME(fit, "flist")[[1]]
  sd <- sqrt(VarCorr(fit)[[1]][1, 1])
  linkinv <- fam$linkinv
  if (fam$family == "binomial") {
    n <- fit@resp$weights
    y <- round(fit@resp$y * n)
    dens <- function(eta, yy, nn) dbinom(yy, nn, linkinv(eta), log = TRUE)
  } else if (fam$family == "poisson") {
    y <- fit@resp$y
    n <- rep(1, length(y))
    dens <- function(eta, yy, nn) dpois(yy, linkinv(eta), log = TRUE)
  } else stop("family not handled")
  total <- 0
  for (idx in split(seq_along(y), g)) {
    yy <- y[idx]; nn <- n[idx]; ee <- eta0[idx]
    lf <- function(b) vapply(b, function(bb) sum(dens(ee + bb, yy, nn)), 0) + dnorm(b, 0, sd, log = TRUE)
    opt <- optimize(lf, c(-12 * sd - 5, 12 * sd + 5), maximum = TRUE, tol = 1e-12)
    bh <- opt$maximum; fm <- opt$objective
    h <- 1e-4 * max(sd, 1e-3)
    curv <- -(lf(bh + h) - 2 * fm + lf(bh - h)) / h^2
    s <- 1 / sqrt(max(curv, 1e-12))
    if (laplace) { total <- total + fm + log(s) + 0.5 * log(2 * pi); next }
    I <- integrate(function(z) exp(lf(bh + s * z) - fm), -40, 40,
                   rel.tol = 1e-10, abs.tol = 0, subdivisions = 2000L)$value
    total <- total + fm + log(s) + log(I)
  }
  total
}

check_lme4 <- function(name, fit) {
  msgs <- c(fit@optinfo$conv$lme4$messages, fit@optinfo$warnings)
  bad <- character()
  if (isSingular(fit, tol = 1e-5)) bad <- c(bad, "singular fit")
  if (length(msgs)) bad <- c(bad, paste("convergence:", unlist(msgs)))
  if (fit@optinfo$conv$opt != 0) bad <- c(bad, "optimizer code != 0")
  if (length(bad)) {
    problems <<- c(problems, sprintf("%s: %s (NOT written)", name, paste(bad, collapse = "; ")))
    return(FALSE)
  }
  TRUE
}

check_tmb <- function(name, fit) {
  bad <- character()
  if (fit$fit$convergence != 0) bad <- c(bad, paste("convergence code", fit$fit$convergence))
  if (!isTRUE(fit$sdr$pdHess)) bad <- c(bad, "Hessian not positive definite")
  vc <- VarCorr(fit)$cond
  for (g in names(vc)) if (any(diag(vc[[g]]) < 1e-8)) bad <- c(bad, "singular (zero variance)")
  if (length(bad)) {
    problems <<- c(problems, sprintf("%s: %s (NOT written)", name, paste(bad, collapse = "; ")))
    return(FALSE)
  }
  TRUE
}

meta <- function(data, formula_lme4, formula_dglmm, family, link, trials = NULL, offset = NULL,
                 fac = list()) {
  list(data = data, formula_lme4 = formula_lme4, formula_dglmm = formula_dglmm,
       family = family, link = link, trials = trials, offset = offset, weights = NULL,
       fac = fac)
}

finish <- function(rec, m, rnames) {
  rec$data <- m$data
  rec$formula_lme4 <- m$formula_lme4
  rec$formula_dglmm <- m$formula_dglmm
  rec$family <- m$family
  rec$link <- m$link
  rec["trials"] <- list(m$trials)    # list(NULL) keeps the field, written as null
  rec["offset"] <- list(m$offset)
  rec["weights"] <- list(m$weights)
  rec$fixed_effect_names_dglmm <- map_names(rnames, m$fac)
  rec
}

add_glmer <- function(name, fit, m, method, note = NULL) {
  if (!check_lme4(name, fit)) return(invisible(NULL))
  fe <- fixef(fit)
  se <- sqrt(diag(as.matrix(vcov(fit))))
  n_agq <- if (method == "ml") 0L else fit@devcomp$dims[["nAGQ"]]
  ll <- if (method == "agq") exact_loglik_scalar(fit) else as.numeric(logLik(fit))
  if (method == "laplace" && length(getME(fit, "theta")) == 1) {
    # lme4's Laplace logLik must be the true Laplace value (canonical links only)
    chk <- exact_loglik_scalar(fit, laplace = TRUE)
    message(sprintf("  check %s: logLik %.8f, Laplace recomputed %.8f", name, ll, chk))
    stopifnot(abs(chk - ll) < 1e-5)
  }
  rec <- list(engine = "lme4", method = method, n_agq = n_agq, loglik = sig(ll),
              fixed_effects = as.list(sig(fe)), std_errors = as.list(setNames(sig(se), names(fe))),
              covariance = cov_blocks_lme4(fit))
  if (method == "ml") rec$residual_variance <- sig(sigma(fit)^2)
  rec$note <- note
  cases[[name]] <<- finish(rec, m, names(fe))
  message(sprintf("%-40s loglik %.8f", name, ll))
}

add_tmb <- function(name, fit, m, note = NULL) {
  if (!check_tmb(name, fit)) return(invisible(NULL))
  fe <- fixef(fit)$cond
  se <- sqrt(diag(vcov(fit)$cond))
  fam <- family(fit)$family
  rec <- list(engine = "glmmTMB", method = "laplace", n_agq = 1L,
              loglik = sig(as.numeric(logLik(fit))),
              fixed_effects = as.list(sig(fe)), std_errors = as.list(setNames(sig(se), names(fe))),
              covariance = cov_blocks_tmb(fit))
  if (fam == "gaussian") {
    rec$method <- "ml"    # exact for a Gaussian LMM (no approximation)
    rec$n_agq <- 0L
    rec$residual_variance <- sig(sigma(fit)^2)
  }
  if (grepl("nbinom", fam)) rec$dispersion <- sig(sigma(fit))
  rec$note <- note
  cases[[name]] <<- finish(rec, m, names(fe))
  message(sprintf("%-40s loglik %.8f", name, as.numeric(logLik(fit))))
}

# tolPwrss: lme4's default (1e-7) leaves the conditional modes loose enough that logLik() is
# off by ~3e-4 from the Laplace value at the reported estimates (cbpp logit); 1e-12 fixes that.
gctrl <- glmerControl(optimizer = "bobyqa", tolPwrss = 1e-12, optCtrl = list(maxfun = 1e5))

# ---------------------------------------------------------------------------------------------
# data sets

# cbpp (shared file, read only): herd, incidence, size, period
cbpp_csv <- read.csv(file.path(out_dir, "cbpp.csv"))
cbpp_csv$period <- sorted_factor(cbpp_csv$period)
cbpp_csv$herd <- factor(cbpp_csv$herd)
fac_period <- list(period = list(expr = "C(period)", levels = levels(cbpp_csv$period)))

# VerbAgg (lme4): binary r2 as 0/1
data("VerbAgg", package = "lme4")
verbagg <- data.frame(id = as.integer(as.character(VerbAgg$id)), Anger = VerbAgg$Anger,
                      Gender = as.character(VerbAgg$Gender), btype = as.character(VerbAgg$btype),
                      situ = as.character(VerbAgg$situ), r2 = as.integer(VerbAgg$r2 == "Y"))
write_csv(verbagg, "verbagg.csv")
va <- verbagg
va$id <- factor(va$id); for (v in c("Gender", "btype", "situ")) va[[v]] <- sorted_factor(va[[v]])
fac_va <- list(Gender = list(expr = "Gender", levels = levels(va$Gender)),
               btype = list(expr = "btype", levels = levels(va$btype)),
               situ = list(expr = "situ", levels = levels(va$situ)))

# Contraception (mlmRev): binary use as 0/1, age centred (years), age2 = age^2 / 100 (scaled so
# that lme4 does not warn about a badly scaled Hessian)
data("Contraception", package = "mlmRev")
contraception <- data.frame(district = as.integer(as.character(Contraception$district)),
                            use = as.integer(Contraception$use == "Y"),
                            age = Contraception$age, age2 = Contraception$age^2 / 100,
                            urban = as.character(Contraception$urban),
                            livch = as.character(Contraception$livch))
write_csv(contraception, "contraception.csv")
ct <- contraception
ct$district <- factor(ct$district); ct$urban <- sorted_factor(ct$urban); ct$livch <- sorted_factor(ct$livch)
fac_ct <- list(urban = list(expr = "urban", levels = levels(ct$urban)),
               livch = list(expr = "livch", levels = levels(ct$livch)))

# Owls (glmmTMB): sibling negotiation counts, offset log(BroodSize)
data("Owls", package = "glmmTMB")
owls <- data.frame(Nest = as.character(Owls$Nest), FoodTreatment = as.character(Owls$FoodTreatment),
                   SexParent = as.character(Owls$SexParent), ArrivalTime = Owls$ArrivalTime,
                   SiblingNegotiation = Owls$SiblingNegotiation, BroodSize = Owls$BroodSize,
                   logBroodSize = log(Owls$BroodSize))
write_csv(owls, "owls.csv")
ow <- owls
ow$Nest <- factor(ow$Nest); ow$FoodTreatment <- sorted_factor(ow$FoodTreatment)
ow$SexParent <- sorted_factor(ow$SexParent)
fac_ow <- list(FoodTreatment = list(expr = "FoodTreatment", levels = levels(ow$FoodTreatment)),
               SexParent = list(expr = "SexParent", levels = levels(ow$SexParent)))

# epil2 (glmmTMB): epilepsy seizure counts (Breslow & Clayton)
data("epil2", package = "glmmTMB")
epil2_df <- data.frame(subject = epil2$subject, y = epil2$y, trt = as.character(epil2$trt),
                       Base = epil2$Base, Age = epil2$Age, Visit = epil2$Visit)
write_csv(epil2_df, "epil2.csv")
ep <- epil2_df
ep$subject <- factor(ep$subject); ep$trt <- sorted_factor(ep$trt)
fac_ep <- list(trt = list(expr = "trt", levels = levels(ep$trt)))

# grouseticks (lme4)
data("grouseticks", package = "lme4")
grouse <- data.frame(BROOD = as.integer(as.character(grouseticks$BROOD)),
                     TICKS = as.integer(grouseticks$TICKS),
                     YEAR = as.integer(as.character(grouseticks$YEAR)),
                     cHEIGHT = grouseticks$cHEIGHT,
                     LOCATION = as.integer(as.character(grouseticks$LOCATION)))
write_csv(grouse, "grouseticks.csv")
gt <- grouse
gt$BROOD <- factor(gt$BROOD); gt$YEAR <- sorted_factor(gt$YEAR)
fac_gt <- list(YEAR = list(expr = "C(YEAR)", levels = levels(gt$YEAR)))

# sleepstudy (shared file, read only)
ss <- read.csv(file.path(out_dir, "sleepstudy.csv"))
ss$Subject <- factor(ss$Subject)

# Dyestuff (lme4)
data("Dyestuff", package = "lme4")
dyestuff <- data.frame(Batch = as.character(Dyestuff$Batch), Yield = Dyestuff$Yield)
write_csv(dyestuff, "dyestuff.csv")
dy <- dyestuff; dy$Batch <- factor(dy$Batch)

# cake (lme4): replicate is a grouping factor; temp numeric
data("cake", package = "lme4")
cake_df <- data.frame(replicate = as.integer(as.character(cake$replicate)),
                      recipe = as.character(cake$recipe), temp = cake$temp, angle = cake$angle)
write_csv(cake_df, "cake.csv")
ck <- cake_df; ck$replicate <- factor(ck$replicate); ck$recipe <- sorted_factor(ck$recipe)
fac_ck <- list(recipe = list(expr = "recipe", levels = levels(ck$recipe)))

# ---------------------------------------------------------------------------------------------
# binomial logit, correlated random intercept and slope

m <- meta("contraception.csv",
          "use ~ age + age2 + urban + livch + (1 + urban | district)",
          "use ~ age + age2 + urban + livch + (1 + urban | district)",
          "binomial", "logit", fac = fac_ct)
f <- glmer(use ~ age + age2 + urban + livch + (1 + urban | district), ct, binomial, control = gctrl)
add_glmer("contraception_logit_slope_laplace", f, m, "laplace")
f <- glmmTMB(use ~ age + age2 + urban + livch + (1 + urban | district), ct, family = binomial)
add_tmb("contraception_logit_slope_laplace_glmmtmb", f, m)

m <- meta("verbagg.csv",
          "r2 ~ Anger + Gender + btype + situ + (1 + situ | id)",
          "r2 ~ Anger + Gender + btype + situ + (1 + situ | id)",
          "binomial", "logit", fac = fac_va)
f <- glmer(r2 ~ Anger + Gender + btype + situ + (1 + situ | id), va, binomial, control = gctrl)
add_glmer("verbagg_logit_slope_laplace", f, m, "laplace")

# binomial logit, scalar random intercept, AGQ (Bernoulli)
m <- meta("contraception.csv",
          "use ~ age + age2 + urban + livch + (1 | district)",
          "use ~ age + age2 + urban + livch + (1 | district)",
          "binomial", "logit", fac = fac_ct)
f <- glmer(use ~ age + age2 + urban + livch + (1 | district), ct, binomial, control = gctrl)
add_glmer("contraception_logit_laplace", f, m, "laplace")
f <- glmer(use ~ age + age2 + urban + livch + (1 | district), ct, binomial, nAGQ = 10, control = gctrl)
add_glmer("contraception_logit_agq10", f, m, "agq")

# ---------------------------------------------------------------------------------------------
# binomial probit and cloglog
#
# For non-canonical links glmer's "Laplace" (nAGQ = 1) uses the expected (Fisher) information
# of the conditional modes in the determinant, not the observed curvature, so it is NOT the
# Laplace approximation (cbpp probit: -92.621 vs -92.584).  The `laplace` references for these
# links are therefore glmmTMB fits (exact Laplace via TMB); the glmer fits are kept with
# method "laplace_fisher" for information only.  The AGQ (nAGQ = 10) cases are integrated
# exactly at lme4's estimates as everywhere else.

FISHER_NOTE <- paste("lme4 nAGQ=1 with a non-canonical link: expected-information Laplace",
                     "(not the true Laplace approximation); for information only")

m <- meta("cbpp.csv",
          "cbind(incidence, size - incidence) ~ period + (1 | herd)",
          "incidence ~ C(period) + (1 | herd)",
          "binomial", "probit", trials = "size", fac = fac_period)
fo <- cbind(incidence, size - incidence) ~ period + (1 | herd)
for (lk in c("probit", "cloglog")) {
  m$link <- lk
  fam <- binomial(link = lk)
  f <- glmmTMB(fo, cbpp_csv, family = fam)
  add_tmb(sprintf("cbpp_%s_laplace", lk), f, m)
  f <- glmer(fo, cbpp_csv, fam, nAGQ = 10, control = gctrl)
  add_glmer(sprintf("cbpp_%s_agq10", lk), f, m, "agq")
  f <- glmer(fo, cbpp_csv, fam, control = gctrl)
  add_glmer(sprintf("cbpp_%s_laplace_lme4_fisher", lk), f, m, "laplace_fisher", note = FISHER_NOTE)
}

m <- meta("verbagg.csv",
          "r2 ~ Anger + Gender + btype + situ + (1 | id)",
          "r2 ~ Anger + Gender + btype + situ + (1 | id)",
          "binomial", "probit", fac = fac_va)
fo <- r2 ~ Anger + Gender + btype + situ + (1 | id)
f <- glmmTMB(fo, va, family = binomial(link = "probit"))
add_tmb("verbagg_probit_laplace", f, m)
f <- glmer(fo, va, binomial(link = "probit"), nAGQ = 10, control = gctrl)
add_glmer("verbagg_probit_agq10", f, m, "agq")
f <- glmer(fo, va, binomial(link = "probit"), control = gctrl)
add_glmer("verbagg_probit_laplace_lme4_fisher", f, m, "laplace_fisher", note = FISHER_NOTE)

# ---------------------------------------------------------------------------------------------
# Poisson

m <- meta("owls.csv",
          "SiblingNegotiation ~ FoodTreatment * SexParent + offset(logBroodSize) + (1 | Nest)",
          "SiblingNegotiation ~ FoodTreatment * SexParent + (1 | Nest)",
          "poisson", "log", offset = "logBroodSize", fac = fac_ow)
fo <- SiblingNegotiation ~ FoodTreatment * SexParent + offset(logBroodSize) + (1 | Nest)
f <- glmer(fo, ow, poisson, control = gctrl)
add_glmer("owls_poisson_offset_laplace", f, m, "laplace")
f <- glmer(fo, ow, poisson, nAGQ = 10, control = gctrl)
add_glmer("owls_poisson_offset_agq10", f, m, "agq")
f <- glmmTMB(fo, ow, family = poisson)
add_tmb("owls_poisson_offset_laplace_glmmtmb", f, m)

m <- meta("owls.csv",
          "SiblingNegotiation ~ FoodTreatment * SexParent + offset(logBroodSize) + (1 + FoodTreatment | Nest)",
          "SiblingNegotiation ~ FoodTreatment * SexParent + (1 + FoodTreatment | Nest)",
          "poisson", "log", offset = "logBroodSize", fac = fac_ow)
f <- glmer(SiblingNegotiation ~ FoodTreatment * SexParent + offset(logBroodSize) + (1 + FoodTreatment | Nest),
           ow, poisson, control = gctrl)
add_glmer("owls_poisson_offset_slope_laplace", f, m, "laplace")

m <- meta("epil2.csv",
          "y ~ Base * trt + Age + Visit + (1 + Visit | subject)",
          "y ~ Base * trt + Age + Visit + (1 + Visit | subject)",
          "poisson", "log", fac = fac_ep)
f <- glmer(y ~ Base * trt + Age + Visit + (1 + Visit | subject), ep, poisson, control = gctrl)
add_glmer("epil2_poisson_slope_laplace", f, m, "laplace")

m <- meta("grouseticks.csv",
          "TICKS ~ YEAR + cHEIGHT + (1 | BROOD)",
          "TICKS ~ C(YEAR) + cHEIGHT + (1 | BROOD)",
          "poisson", "log", fac = fac_gt)
fo <- TICKS ~ YEAR + cHEIGHT + (1 | BROOD)
f <- glmer(fo, gt, poisson, control = gctrl)
add_glmer("grouseticks_poisson_laplace", f, m, "laplace")
f <- glmer(fo, gt, poisson, nAGQ = 10, control = gctrl)
add_glmer("grouseticks_poisson_agq10", f, m, "agq")

# negative binomial (NB2) with offset: glmmTMB only (lme4 has no such GLMM with a fixed-k ML fit)
m <- meta("owls.csv",
          "SiblingNegotiation ~ FoodTreatment * SexParent + offset(logBroodSize) + (1 | Nest)",
          "SiblingNegotiation ~ FoodTreatment * SexParent + (1 | Nest)",
          "nbinom2", "log", offset = "logBroodSize", fac = fac_ow)
f <- glmmTMB(SiblingNegotiation ~ FoodTreatment * SexParent + offset(logBroodSize) + (1 | Nest),
             ow, family = nbinom2)
add_tmb("owls_nbinom2_offset_laplace", f, m)

# ---------------------------------------------------------------------------------------------
# Gaussian, maximum likelihood

m <- meta("sleepstudy.csv", "Reaction ~ Days + (Days || Subject)", "Reaction ~ Days + (Days || Subject)",
          "gaussian", "identity")
f <- lmer(Reaction ~ Days + (Days || Subject), ss, REML = FALSE)
add_glmer("sleepstudy_diag_ml", f, m, "ml")

m <- meta("dyestuff.csv", "Yield ~ 1 + (1 | Batch)", "Yield ~ 1 + (1 | Batch)", "gaussian", "identity")
f <- lmer(Yield ~ 1 + (1 | Batch), dy, REML = FALSE)
add_glmer("dyestuff_ml", f, m, "ml")

m <- meta("cake.csv", "angle ~ recipe + temp + (1 | replicate)", "angle ~ recipe + temp + (1 | replicate)",
          "gaussian", "identity", fac = fac_ck)
f <- lmer(angle ~ recipe + temp + (1 | replicate), ck, REML = FALSE)
add_glmer("cake_ml", f, m, "ml")
f <- glmmTMB(angle ~ recipe + temp + (1 | replicate), ck)
add_tmb("cake_ml_glmmtmb", f, m)

# ---------------------------------------------------------------------------------------------
# sanity check of the AGQ integration against the shared reference (cbpp, nAGQ = 25)

shared <- fromJSON(file.path(out_dir, "reference_fits.json"))
f <- glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp_csv, binomial, nAGQ = 25)
chk <- exact_loglik_scalar(f)
message(sprintf("check cbpp_agq25: integrated %.8f vs shared %.8f", chk, shared$cbpp_agq25$loglik))
stopifnot(abs(chk - shared$cbpp_agq25$loglik) < 1e-6)

# ---------------------------------------------------------------------------------------------
# write

writeLines(toJSON(cases, auto_unbox = TRUE, pretty = TRUE, digits = NA, null = "null"),
           file.path(out_dir, "extra_reference_fits.json"))

sal_levels_mined <- "C(mined, levels=['yes', 'no'])"
sal_levels_spp <- "C(spp, levels=['GP', 'PR', 'DM', 'EC-A', 'EC-L', 'DES-L', 'DF'])"
sal_fac <- list(mined = list(expr = sal_levels_mined, levels = c("yes", "no")),
                spp = list(expr = sal_levels_spp, levels = c("GP", "PR", "DM", "EC-A", "EC-L", "DES-L", "DF")))
shared_case <- function(name, data, formula, family, link, trials = NULL, offset = NULL, fac = list()) {
  list(data = data, formula_dglmm = formula, family = family, link = link, trials = trials,
       offset = offset, weights = NULL,
       fixed_effect_names_dglmm = map_names(names(shared[[name]]$fixed_effects), fac))
}
sal_formula <- sprintf("count ~ %s + %s + (1 | site)", sal_levels_mined, sal_levels_spp)
shared_cases <- list(
  cbpp_laplace = shared_case("cbpp_laplace", "cbpp.csv", "incidence ~ C(period) + (1 | herd)",
                             "binomial", "logit", trials = "size", fac = fac_period),
  cbpp_agq25 = shared_case("cbpp_agq25", "cbpp.csv", "incidence ~ C(period) + (1 | herd)",
                           "binomial", "logit", trials = "size", fac = fac_period),
  sleepstudy_ml = shared_case("sleepstudy_ml", "sleepstudy.csv", "Reaction ~ Days + (Days | Subject)",
                              "gaussian", "identity"),
  salamanders_poisson_laplace = shared_case("salamanders_poisson_laplace", "salamanders.csv",
                                            sal_formula, "poisson", "log", fac = sal_fac),
  salamanders_poisson_agq15 = shared_case("salamanders_poisson_agq15", "salamanders.csv",
                                          sal_formula, "poisson", "log", fac = sal_fac),
  salamanders_nbinom2_laplace = shared_case("salamanders_nbinom2_laplace", "salamanders.csv",
                                            sal_formula, "nbinom2", "log", fac = sal_fac)
)
writeLines(toJSON(shared_cases, auto_unbox = TRUE, pretty = TRUE, digits = NA, null = "null"),
           file.path(out_dir, "shared_cases.json"))

# human-readable index of the extra cases
nrows <- function(f) nrow(read.csv(file.path(out_dir, f)))
esc <- function(x) gsub("|", "\\|", x, fixed = TRUE)
lines <- c(
  "# Extra reference fits",
  "",
  "Written by `Rscript benchmarks/r/make_references.R` (run from the repository root; do not edit",
  "by hand).  `extra_reference_fits.json` has the same layout as `reference_fits.json` (see",
  "`REFERENCE.md`) plus, per case: `data` (CSV here), `formula_lme4`, `formula_dglmm`, `family`,",
  "`link`, `trials`, `offset` (a column holding the offset itself, e.g. `logBroodSize`),",
  "`weights`, `fixed_effect_names_dglmm` (R coefficient name -> formulaic column name) and",
  "sometimes `note`.  `shared_cases.json` gives the same metadata for the cases of",
  "`reference_fits.json`.",
  "",
  "* `loglik` is the full log-likelihood with all constants.  `agq` values are integrated",
  "  numerically per group (R `integrate`, rel.tol 1e-10) at lme4's estimates.",
  "* `laplace_fisher` cases are glmer's nAGQ = 1 fits with a non-canonical link (probit, cloglog):",
  "  lme4 then uses the expected information in the Laplace determinant, which is not the Laplace",
  "  approximation.  They are informational only; the `laplace` references for those links are",
  "  glmmTMB fits.",
  "* glmer fits here use `tolPwrss = 1e-12`.  With lme4's default (1e-7) the Laplace logLik is",
  "  about 3e-4 off the Laplace value at its own estimates: the shared `cbpp_laplace` reference",
  "  (-92.02656639) is such a value; the converged Laplace optimum is -92.02628 (glmmTMB agrees).",
  "  Use a loglik tolerance of ~1e-3 for that shared case.",
  "* nbinom2 cases give the NB2 size k (variance mu + mu^2/k) in `dispersion`.",
  "* `contraception.csv`: `age` is centred age in years, `age2` is `age^2 / 100`.",
  "* Factor levels in R were put in dglmm's sorted order, so the names map one to one.",
  "",
  "| case | engine | method | data (rows) | model (lme4 syntax) | family / link |",
  "| --- | --- | --- | --- | --- | --- |")
for (nm in names(cases)) {
  cs <- cases[[nm]]
  lines <- c(lines, sprintf("| %s | %s | %s%s | %s (%d) | `%s` | %s / %s |", nm, cs$engine, cs$method,
                            if (cs$method == "agq") paste0(" ", cs$n_agq) else "",
                            cs$data, nrows(cs$data), esc(cs$formula_lme4), cs$family, cs$link))
}
if (length(problems)) {
  lines <- c(lines, "", "Fits left out by the last run (not converged or singular):", "",
             paste0("* ", gsub("\n", " ", problems)))
}
writeLines(lines, file.path(out_dir, "EXTRA_REFERENCE.md"))

message(sprintf("\n%d cases written to %s/extra_reference_fits.json", length(cases), out_dir))
if (length(problems)) {
  message("Fits left out:")
  for (p in problems) message("  ", p)
} else message("No fits left out.")
