"""Services: the work behind the routers, with collaborators given in `__init__`."""
