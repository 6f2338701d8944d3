"""Device meshes, logical axis names and the rules that map them onto mesh axes."""
