# misspelt_dataset.kt: a dataset name with a typo
# expect: E204
graph misspelt_dataset
data cifar1000 { val_split = 5000 }
node a : resnet32 [target]
label -> a : through
