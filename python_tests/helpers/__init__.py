"""Shared test harness: flash-attn's tolerance rule, op cases and inputs, sm_90 compile checks."""
