import sys

from spin_k8s.controller.manager import main

sys.exit(main())
