"""Meshes, the logical->mesh rule table, sharded state/batches, and explicit-collective kernels."""
