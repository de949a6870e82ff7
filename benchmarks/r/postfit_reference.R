# Reference numbers for issue 15's post-fit toolkit: lme4's anova() of nested glmer fits and
# confint(method = "profile") / confint(method = "Wald"), on lme4's cbpp data (also
# tests/data/cbpp.csv) and on sleepstudy by ML.  Writes tests/data/postfit_reference.json.
#
#   Rscript benchmarks/r/postfit_reference.R tests/data/postfit_reference.json
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
args <- commandArgs(trailingOnly = TRUE)
out <- if (length(args)) args[1] else "postfit_reference.json"
ctrl <- glmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-9), tolPwrss = 1e-12)

table_of <- function(a) {
  lapply(seq_len(nrow(a)), function(i) list(
    model = rownames(a)[i], npar = a$npar[i], AIC = a$AIC[i], BIC = a$BIC[i],
    logLik = a$logLik[i], deviance = a[["deviance"]][i],
    Chisq = if (is.na(a$Chisq[i])) NULL else a$Chisq[i],
    Df = if (is.na(a$Df[i])) NULL else a$Df[i],
    p = if (is.na(a[["Pr(>Chisq)"]][i])) NULL else a[["Pr(>Chisq)"]][i]))
}
ci_of <- function(ci) {
  lapply(seq_len(nrow(ci)), function(i) list(
    name = rownames(ci)[i], lower = ci[i, 1], upper = ci[i, 2]))
}

# cbpp: period effects, random herd intercept
gm0 <- glmer(cbind(incidence, size - incidence) ~ 1 + (1 | herd), cbpp, binomial, control = ctrl)
gm1 <- glmer(cbind(incidence, size - incidence) ~ period + (1 | herd), cbpp, binomial,
             control = ctrl)
cbpp_anova <- anova(gm0, gm1)
cbpp_profile <- confint(gm1, method = "profile", level = 0.95)
cbpp_wald <- confint(gm1, method = "Wald", level = 0.95)

# sleepstudy by ML: a random slope added (a variance on the boundary under the null)
sleepstudy <- lme4::sleepstudy
m0 <- lmer(Reaction ~ Days + (1 | Subject), sleepstudy, REML = FALSE)
m1 <- lmer(Reaction ~ Days + (1 + Days | Subject), sleepstudy, REML = FALSE)
sleep_anova <- anova(m0, m1)
sleep_profile <- confint(m1, method = "profile", level = 0.95)

res <- list(
  versions = list(R = R.version.string, lme4 = as.character(packageVersion("lme4"))),
  cbpp = list(
    formulas = c(deparse(formula(gm0)), deparse(formula(gm1))),
    anova = table_of(cbpp_anova),
    profile = ci_of(cbpp_profile), wald = ci_of(cbpp_wald),
    loglik = c(as.numeric(logLik(gm0)), as.numeric(logLik(gm1)))),
  sleepstudy_ml = list(
    formulas = c(deparse(formula(m0)), deparse(formula(m1))),
    anova = table_of(sleep_anova), profile = ci_of(sleep_profile),
    loglik = c(as.numeric(logLik(m0)), as.numeric(logLik(m1)))))
writeLines(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE), out)
