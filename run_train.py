"""Train a classifier: python run_train.py --config configs/demo.py --workdir /tmp/demo"""

if __name__ == "__main__":
  from jaxcls import _launch
  _launch.reexec_with_tuned_allocator()  # Before JAX loads; see jaxcls/_launch.py.

  from jaxcls.main import run
  run()
