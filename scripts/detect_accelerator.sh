#!/usr/bin/env bash
# Prints the jax extra this machine needs: cuda12 or cuda13 (an NVIDIA GPU; 13 when the
# driver supports CUDA 13), tpu (a TPU VM), or nothing (CPU only). Used by the Makefile.
# DEV_ROOT (default /dev) is for tests.
dev="${DEV_ROOT:-/dev}"
if [ -e "$dev/nvidia0" ] || { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  cuda="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n1)"
  if [ -n "$cuda" ] && [ "$cuda" -ge 13 ]; then echo cuda13; else echo cuda12; fi
elif compgen -G "$dev/accel[0-9]*" >/dev/null || compgen -G "$dev/vfio/[0-9]*" >/dev/null; then
  echo tpu
fi
