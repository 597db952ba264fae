"""What the tests share and are not tests themselves: a `pdserve up` stack as a real
process (`stack.py`), workers as real processes (`workers.py`), the compose file run as
local processes (`compose_local.py`), throwaway certificates (`tls_certs.py`) and the
kernels' own harness, native and for ARM64 under qemu (`kernel_harness.py`)."""
