"""Meshes, logical-axis rule tables and remat policies: where the model's named axes live on devices."""
