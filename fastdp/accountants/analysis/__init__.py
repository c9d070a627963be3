"""Pure numpy/scipy privacy analyses; the accountant classes wrap them."""
