"""A whole session: run or resume it, check the mesh's health first, and say who speaks when."""
