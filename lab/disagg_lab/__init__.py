"""The local cluster's lab: what plays the parts a real cluster has and this machine lacks.

Development only: installed into the project's .venv by hack/venv.sh, never into the operator's image
(tests/packaging/test_dockerfile.py checks the image's files). kwok pods run no process, so:

- `disagg-lab fleet` plays the engine of every Ready prefill and decode pod on the pod's own loopback IP,
  speaking the engines' P/D protocols and stepping `disagg simulate`'s engine model live;
- `disagg-lab routers` runs the real router binary (vllm-router, sglang-router) of every router pod with
  the pod's command, arguments, environment and ServiceAccount, and probes it as a kubelet would;
- `disagg-lab load` sends real OpenAI requests to a service's endpoint through its ready endpoints, as
  kube-proxy would route them.
"""
