# model_bad_arguments.kt: arguments a model's constructor does not take
# expect: E221 E221 E221 E221 E407
graph model_bad_arguments

data cifar100 {
  val_split = 5000
}

node student : resnet32(depth=3)                                                       [target]
node teacher : torchvision.resnet18(wieghts="IMAGENET1K_V1")                           [frozen]
node peer    : torchvision.resnet18(num_classes=100)
node other   : torchvision.resnet18(weights="IMAGENET9K_V1")
node twice   : torchvision.resnet18(zero_init_residual=true, zero_init_residual=false)

label   -> student : through
label   -> peer    : through
label   -> other   : through
label   -> twice   : through
teacher -> student : through
peer    -> student : through
other   -> student : through
twice   -> student : through
