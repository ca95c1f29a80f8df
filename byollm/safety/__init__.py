"""Safety: bias scores (CrowS-Pairs) and other checks of guide section 7."""
