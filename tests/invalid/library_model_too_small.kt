# library_model_too_small.kt: torchvision's SqueezeNet pools digits' 8x8 images to nothing
# expect: E222
graph library_model_too_small
data digits { }
node s : torchvision.squeezenet1_0 [target]
label -> s : through
