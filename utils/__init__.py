"""What the scripts share, one concern a module. The scripts import from the modules themselves:

config        the project's facts: names, sizes, paths, limits
files         errors a user can fix, atomic writes, the run lock, disk and memory checks, progress
images        the one image decoder; splits listed, loaded into memory or streamed from disk
sources       a folder, zip or URL of photos: its classes among whatever else it holds, hashed and decoded
warps         what the augmentation engines share: random transforms, the plan of batches, targets
augment       `batches`: one of the engines engine_tf (tf.data), engine_numpy (no TensorFlow), engine_idg
model         the CNN, the class names it carries, its compiled training form
backend       Keras's backend, precision by device, --devices and --processes
fit           training that survives kill -9: validation, best epoch, log, backup, resume
evaluate      the mirror-averaged prediction, accuracy, loss, per-class scores, metrics.json
explain       LayerCAM in closed form inside the model, and heat maps
export        the LiteRT copy of a model, with class names and heat maps inside
runtime       a .keras or .tflite file loaded for prediction (LiteRT needs no TensorFlow)
plots         figures and photo grids written as files
"""
