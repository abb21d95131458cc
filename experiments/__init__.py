"""Training scripts and configs built on the arl_jax library."""
