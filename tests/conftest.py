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
