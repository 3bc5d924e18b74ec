"""Not code: marks `recipes/` as the package data `doai.recipes`, so an installed doai finds the bundled recipes."""
