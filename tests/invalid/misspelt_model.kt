# misspelt_model.kt: a model name with a typo
# expect: E200
graph misspelt_model
data cifar100 { val_split = 5000 }
node student : resnet23 [target]
label -> student : through
