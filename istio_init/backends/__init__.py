"""Ways of getting a rule plan into the kernel; see base.py for the seam."""
