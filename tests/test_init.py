"""Process-wide settings made by `import jaxscale` (each checked in a fresh interpreter)."""
import json
import os
import subprocess
import sys

import pytest

# one 10^5-row KB evaluation, repeated: its ~1.4 MB of XLA scratch per call
PROBE = """
import resource, sys, json
import jaxscale, jax, jax.numpy as jnp, numpy as np
from jaxscale.serial import simulate_flat_stills
from jaxscale.target import native_kb
from jaxscale.target.sharding import KBStillsTarget, make_observations
native = native_kb.available(build=True)
n_exp = 1000
sim = simulate_flat_stills(n_exp, 100, seed=0)
obs = make_observations(sim["intensity"], 1 / sim["variance"], sim["d"], sim["group_id"], sim["experiment_index"],
                        int(sim["n_groups"]), n_exp, mesh=None, dtype=jnp.float64)
target = KBStillsTarget(None)
x = jnp.asarray(np.stack([np.ones(n_exp), np.zeros(n_exp)], 1))
free = jnp.ones((n_exp, 2), bool)
for _ in range(10): jax.block_until_ready(target.value_and_grad(x, obs, free, x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100): jax.block_until_ready(target.value_and_grad(x, obs, free, x))
print(json.dumps({"async": jax.config.values["jax_cpu_enable_async_dispatch"], "native": native, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100}))
"""


def _probe(**env_overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "JAX_CPU_ENABLE_ASYNC_DISPATCH"}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_programs_run_on_the_calling_thread_unless_the_user_chose():
    assert _probe()["async"] is False
    assert _probe(JAX_CPU_ENABLE_ASYNC_DISPATCH="1")["async"] is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_evaluation_scratch_is_not_faulted_in_again_on_every_call():
    # glibc's start thresholds give the scratch back at each free: 56 page faults per call on
    # the native path, 143 on XLA's, measured with the settings skipped (MALLOC_ARENA_MAX set)
    assert _probe()["faults"] < 5
    assert _probe(JAXSCALE_NATIVE_KERNEL="0")["faults"] < 5
