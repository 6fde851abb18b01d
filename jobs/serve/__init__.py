"""``mmfp serve``: the store as an online feature and nearest-neighbour service (Ray Serve)."""
