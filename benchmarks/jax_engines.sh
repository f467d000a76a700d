#!/usr/bin/env bash
# One epoch on Keras's JAX backend: --engine numpy with TensorFlow hidden from Python, against the tf.data engine
# (--engine layers), on the cats-and-dogs split at 64 px and the flowers at 160 px; then two processes (--processes 2)
# on one machine; then 3 short epochs with each engine, for their accuracy. Run from the repository root after
# prepare_data.py (both splits); results: benchmarks/results/jax/.
# TensorFlow is hidden as tests/test_numpy_engine.py hides it: links to every other package of site-packages.
set -u
PY=${PYTHON:-python}
SITE=$($PY -c "import keras, pathlib; print(pathlib.Path(keras.__file__).resolve().parent.parent)")
HIDE=$(mktemp -d)
mkdir "$HIDE/site-packages" "$HIDE/hook"
for e in "$SITE"/*; do case $(basename "$e") in tensorflow*) ;; *) ln -s "$e" "$HIDE/site-packages/";; esac; done
printf 'import sys\nsys.path = [p for p in sys.path if p != %s] + [%s]\n' "'$SITE'" "'$HIDE/site-packages'" > "$HIDE/hook/sitecustomize.py"
lscpu | grep "Model name"
for engine in numpy layers; do
  hook=""; [ $engine = numpy ] && hook=$HIDE/hook
  echo "== $engine 64px full split"
  PYTHONPATH=$hook KERAS_BACKEND=jax /usr/bin/time -f "peak %M kB wall %e s" $PY train.py --epochs 1 --image-size 64 --progressive 0 --engine $engine --out runs/jax64-$engine 2>&1 | tr '\r' '\n' | grep -E "^287/287|peak|test acc|loaded"
done
for engine in numpy layers; do
  hook=""; [ $engine = numpy ] && hook=$HIDE/hook
  echo "== $engine 160px flowers"
  PYTHONPATH=$hook KERAS_BACKEND=jax /usr/bin/time -f "peak %M kB wall %e s" $PY train.py --data data/flowers --epochs 1 --image-size 160 --progressive 0 --engine $engine --out runs/jaxfl-$engine 2>&1 | tr '\r' '\n' | grep -E "^[0-9]+/[0-9]+ -|peak|test acc|loaded|recipe"
done
echo "== 2 processes numpy 64px full split"
for i in 0 1; do
  KERAS_BACKEND=jax /usr/bin/time -f "peak %M kB wall %e s" $PY train.py --epochs 1 --image-size 64 --progressive 0 --engine numpy --out runs/jax64-2p --processes 2 --process-id $i --coordinator localhost:12391 > "$HIDE/p$i.log" 2>&1 &
done
wait
for i in 0 1; do tr '\r' '\n' < "$HIDE/p$i.log" | grep -E "^287/287|peak|test acc|devices"; done
echo "== quality: 3 epochs (32, 32, 64 px), seed 42, JAX, each engine"
for engine in numpy layers; do
  hook=""; [ $engine = numpy ] && hook=$HIDE/hook
  PYTHONPATH=$hook KERAS_BACKEND=jax $PY train.py --epochs 3 --image-size 64 --engine $engine --out runs/jax3-$engine 2>&1 | tr '\r' '\n' | grep -E "^287/287|test acc"
done
rm -rf "$HIDE"
