"""`python -m ft_appliance.worker`: what torchrun starts on every rank (see main.py)."""

from .main import exit_now, main

exit_now(main())
