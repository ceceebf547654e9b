"""Lab containers: the role vzctl plays in the seed's test plan."""
