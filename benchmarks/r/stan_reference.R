# Bayesian posterior reference numbers from rstanarm's stan_glmer on lme4's cbpp data:
# binomial GLMM with period effects and a random herd intercept, flat priors on all fixed
# effects (intercept included) and, through decov(1, 1, 1, 1) on the 1x1 herd covariance,
# tau = sd((Intercept) | herd) ~ Gamma(shape = 1, scale = 1) = Exponential(rate = 1).
# (rstanarm's Stan code for one 1x1 covariance: theta_L = scale * tau, tau ~ gamma(shape, 1);
# no autoscaling of the decov scale for a binomial family.)  Writes tests/data/stan_reference.json.
#
#   Rscript benchmarks/r/stan_reference.R tests/data/stan_reference.json
#
# Needs Debian's r-cran-lme4 r-cran-jsonlite r-cran-rstanarm r-cran-posterior.
suppressPackageStartupMessages({
  library(lme4); library(jsonlite); library(rstanarm); library(posterior)
})
args <- commandArgs(trailingOnly = TRUE)
out <- if (length(args)) args[1] else "stan_reference.json"

data(cbpp, package = "lme4")
seed <- 20261207L
chains <- 4L
iter <- 20000L
warmup <- 2000L
cores <- 2L  # chains are seeded by (seed, chain id): the draws do not depend on cores

call_text <- paste(
  "stan_glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), data = cbpp,",
  "family = binomial, prior = NULL, prior_intercept = NULL,",
  "prior_covariance = decov(regularization = 1, concentration = 1, shape = 1, scale = 1),",
  "chains = 4, iter = 20000, warmup = 2000, seed = 20261207, adapt_delta = 0.99,",
  "refresh = 0, cores = 2)")

wall <- system.time(
  fit <- stan_glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), data = cbpp,
                    family = binomial, prior = NULL, prior_intercept = NULL,
                    prior_covariance = decov(regularization = 1, concentration = 1,
                                             shape = 1, scale = 1),
                    chains = chains, iter = iter, warmup = warmup, seed = seed,
                    adapt_delta = 0.99, refresh = 0, cores = cores)
)[["elapsed"]]

prior_text <- paste(capture.output(print(prior_summary(fit), digits = 6)), collapse = "\n")

# iterations x chains x parameters, post-warmup
arr <- as.array(fit)
sigma_name <- "Sigma[herd:(Intercept),(Intercept)]"
stopifnot(sigma_name %in% dimnames(arr)[[3]])
fixed <- c("(Intercept)", "period2", "period3", "period4")
draws <- list()
for (p in fixed) draws[[p]] <- arr[, , p]
draws[["sd((Intercept) | herd)"]] <- sqrt(arr[, , sigma_name])
# consistency with as.matrix(fit), as the brief defines the sd draws from it
m <- as.matrix(fit)
stopifnot(isTRUE(all.equal(sort(sqrt(m[, sigma_name])),
                           sort(as.vector(draws[["sd((Intercept) | herd)"]])))))

params <- lapply(names(draws), function(p) {
  x <- draws[[p]]  # iterations x chains matrix
  q <- quantile(as.vector(x), probs = c(0.03, 0.97), names = FALSE, type = 7)
  list(parameter = p,
       mean = mean(x), sd = sd(as.vector(x)),
       mcse_mean = posterior::mcse_mean(x),
       q3 = q[1], q97 = q[2],
       rhat = posterior::rhat(x),
       ess_bulk = posterior::ess_bulk(x),
       ess_tail = posterior::ess_tail(x))
})

sp <- rstan::get_sampler_params(fit$stanfit, inc_warmup = FALSE)
divergent <- sum(sapply(sp, function(s) sum(s[, "divergent__"])))
max_treedepth <- max(sapply(sp, function(s) max(s[, "treedepth__"])))

res <- list(
  data = "lme4::cbpp",
  formula = "cbind(incidence, size - incidence) ~ period + (1 | herd)",
  family = "binomial",
  priors = list(
    fixed = "flat (prior=NULL, prior_intercept=NULL)",
    `sd((Intercept) | herd)` = "exponential(rate=1) via decov(1,1,1,1)"),
  settings = list(
    call = call_text, seed = seed, chains = chains, iter = iter, warmup = warmup,
    draws_per_chain = iter - warmup, total_draws = chains * (iter - warmup),
    adapt_delta = 0.99, cores = cores, wall_seconds = unname(wall),
    divergent_transitions = divergent, max_treedepth_seen = max_treedepth,
    quantile_type = "R quantile type 7 on pooled post-warmup draws",
    mcse_ess_rhat = "posterior package: mcse_mean, ess_bulk, ess_tail, rhat (rank-normalized split-Rhat)",
    sd_draws = "sqrt of Sigma[herd:(Intercept),(Intercept)] draws"),
  versions = list(
    R = R.version.string,
    rstanarm = as.character(packageVersion("rstanarm")),
    rstan = as.character(packageVersion("rstan")),
    StanHeaders = as.character(packageVersion("StanHeaders")),
    posterior = as.character(packageVersion("posterior")),
    lme4 = as.character(packageVersion("lme4"))),
  prior_summary = prior_text,
  parameters = params)

dir.create(dirname(out), showWarnings = FALSE, recursive = TRUE)
writeLines(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE), out)
cat(prior_text, "\n")
tab <- do.call(rbind, lapply(params, function(p) as.data.frame(p, check.names = FALSE)))
print(tab, digits = 6, row.names = FALSE)
cat(sprintf("wall %.1f s, divergent %d, max treedepth %d\n", wall, divergent, max_treedepth))
cat("wrote", out, "\n")
