"""Every test sees 8 simulated CPU devices, set before jax is first imported."""

import os
import sys

# Not --xla_cpu_enable_concurrency_optimized_scheduler=false: it makes CPU memory_analysis() honour
# remat but can deadlock multi-device CPU collectives; memory tests run `launch.memory` in a
# subprocess, which sets it for a single device.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.run.devices import simulate_cpu_devices  # noqa: E402

simulate_cpu_devices(8)

import pytest  # noqa: E402

import gcs_emulator  # noqa: E402

# tensorstore, gcsfs and google-cloud-storage read their emulator variables once: set them before any
# test can touch them; the server itself starts only when a test asks for it (tests/test_bucket.py).
_GCS_PORT = gcs_emulator.reserve_port()


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A running GCS emulator (fake-gcs-server) on 127.0.0.1 that every gs:// path of the session reaches;
  objects that commands download go to a session cache (SHARDLM_GCS_CACHE), not ~/.cache."""
  os.environ["SHARDLM_GCS_CACHE"] = str(tmp_path_factory.mktemp("gcs-cache"))
  emulator = gcs_emulator.start(_GCS_PORT)
  yield emulator
  emulator.stop()
