"""Per-subscriber random-effect predictions of a 200,000-row fit against the simulated truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import dglmm
from dglmm.api import IN_PROCESS
from dglmm.simulate import simulate_calls


@pytest.mark.slow
def test_random_effects_table_of_a_200k_row_fit(tmp_path):
    df, truth, effects = simulate_calls(10_000, seed=11, return_effects=True)
    assert len(df) > 190_000
    out = tmp_path / "re"
    result = dglmm.fit(truth["formula"], df, client=IN_PROCESS, random_effects=str(out))
    table = pd.read_parquet(out)
    # one row per subscriber
    assert len(table) == table["subscriber"].nunique() == 10_000
    both = table.merge(effects, on="subscriber", validate="one_to_one")
    sd_true = np.sqrt(np.diag(np.asarray(truth["covariance"])))
    for term, col, sd in (("Intercept", "u0", sd_true[0]), ("duration", "u1", sd_true[1])):
        corr = np.corrcoef(both[f"{term}_mode"], both[col])[0, 1]
        # A prediction E[b | y] correlates with b by at most sqrt(1 - E Var(b | y) / Var(b)):
        # with ~20 binary calls per subscriber that is what the data allow.
        attainable = np.sqrt(max(0.0, 1.0 - np.mean(both[f"{term}_sd"] ** 2) / sd**2))
        assert corr > 0.9 * attainable, (term, corr, attainable)
        assert corr > {"Intercept": 0.6, "duration": 0.35}[term], (term, corr)
    # the posterior sds are honest: standardised errors have about unit variance
    z = (both["Intercept_mode"] - both["u0"]) / both["Intercept_sd"]
    assert 0.85 < z.std() < 1.15
    assert result.converged
