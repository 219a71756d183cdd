"""The data stage: read and validate rows, render and mask them, cache, sample and batch them."""
