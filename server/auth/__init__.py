"""Bearer tokens with roles: operator, rig, worker, viewer."""
