"""The implementation of arl_jax; private. Import the public API from
:mod:`arl_jax` and its public modules instead."""
