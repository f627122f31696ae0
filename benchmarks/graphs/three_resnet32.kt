# three_resnet32.kt: the paper's search unit on one accelerator: three ResNet32 nodes on a
# CIFAR-100-shaped batch, every node teaching every other. benchmarks/pack_ops.py packs K copies
# of it into one union step (benchmarks/gpu.sh, on CUDA); it reads no data.
graph three_resnet32

data cifar100 {
  val_split = 5000
}

train {
  epochs = 200
  batch = 64
  optimizer = sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)
  schedule = cosine
}

node n1 : resnet32 [target]
node n2 : resnet32
node n3 : resnet32

label -> n1 : through
label -> n2 : through
label -> n3 : through
n2 -> n1 : linear
n3 -> n1 : correct
n1 -> n2 : through
n3 -> n2 : linear
n1 -> n3 : correct
n2 -> n3 : through
